"""`moeforge inspect`: routing counts checked against transformers' own router logits, for several MoE layouts."""
import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import CODE, STORY, expert_config

import moeforge
from moeforge.cli import cli

PROMPTS = CODE + STORY + ["Solve for x: 2x + 3 = 7"]


@pytest.fixture(scope="module")
def mixtral_moe(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "moe"
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]], gate_mode="fitted"), out,
                   quiet=True, hidden_dtype="float32")
    return out


def _tiny_moe(path, kind):
    """A random-init Qwen2-MoE / Qwen3-MoE with the toy tokenizer: layouts moeforge may write, loaded generically."""
    import transformers

    from moeforge.toy import make_tokenizer

    tok = make_tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  intermediate_size=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=32, **common)
    else:
        config = transformers.Qwen3MoeConfig(**common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path


def _reference_counts(model_dir, prompts, top_k):
    """Per layer top-1 / top-k counts from output_router_logits, one prompt at a time (no padding), bos skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    top1 = topk = None
    for p in prompts:
        ids = tok(tok.bos_token + p, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids, output_router_logits=True).router_logits
        chosen = [l[1:].topk(top_k, dim=-1).indices for l in logits]
        n = logits[0].shape[-1]
        t1 = torch.stack([torch.bincount(c[:, 0], minlength=n) for c in chosen])
        tk = torch.stack([torch.bincount(c.reshape(-1), minlength=n) for c in chosen])
        top1 = t1 if top1 is None else top1 + t1
        topk = tk if topk is None else topk + tk
    return top1, topk


def _table_rows(text):
    """layer -> list of percentages in the table."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(\d+|mean)\s+(.*%)\s*$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in re.findall(r"([\d.]+)%", m.group(2))]
    return rows


def test_inspect_counts_match_transformers_router_logits(mixtral_moe, tmp_path):
    from moeforge.inspect import inspect_model
    from moeforge.inspect.prompts_file import Prompt

    report = inspect_model(mixtral_moe, [Prompt(p) for p in PROMPTS], batch_size=3, quiet=True)
    top1, topk = _reference_counts(mixtral_moe, PROMPTS, 2)
    assert torch.equal(report.top1, top1) and torch.equal(report.topk, topk)
    assert report.tokens == int(top1[0].sum()) and report.expert_names == ["code", "story"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    result = CliRunner().invoke(cli, ["inspect", str(mixtral_moe), "--prompts", str(prompts), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    assert set(rows) == {"0", "1", "mean"}
    for layer in (0, 1):
        shares = rows[str(layer)]
        assert shares[:2] == pytest.approx((100 * top1[layer] / report.tokens).tolist(), abs=0.06)
        assert sum(shares[:2]) == pytest.approx(100, abs=0.2) and sum(shares[2:4]) == pytest.approx(200, abs=0.2)
    assert "0 = code, 1 = story" in result.output


def test_inspect_jsonl_labels_report_agreement(mixtral_moe, tmp_path):
    from moeforge.inspect import inspect_model
    from moeforge.inspect.prompts_file import read_prompts

    path = tmp_path / "p.jsonl"
    lines = [{"text": CODE[0], "expert": 0}, {"prompt": STORY[0], "expert": "story"}, json.dumps("no label")]
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    report = inspect_model(mixtral_moe, read_prompts(path), quiet=True)
    # reference agreement: labelled tokens whose top-1 is their label, from transformers' router logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mixtral_moe))
    model = AutoModelForCausalLM.from_pretrained(str(mixtral_moe)).eval()
    correct, total = torch.zeros(2), 0
    for text, label in ((CODE[0], 0), (STORY[0], 1)):
        ids = tok(tok.bos_token + text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids, output_router_logits=True).router_logits
        correct += torch.tensor([float((l[1:].argmax(-1) == label).sum()) for l in logits])
        total += ids["input_ids"].shape[1] - 1
    assert report.labelled == total
    assert torch.allclose(report.agreement, correct / total)
    assert "label first" in report.table()


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe"])
def test_inspect_is_generic_over_layouts(kind, tmp_path):
    from moeforge.inspect import find_routers, inspect_model
    from moeforge.inspect.prompts_file import Prompt

    model_dir = _tiny_moe(tmp_path / kind, kind)
    report = inspect_model(model_dir, [Prompt(p) for p in PROMPTS], batch_size=4, quiet=True)
    top1, topk = _reference_counts(model_dir, PROMPTS, 2)
    assert torch.equal(report.top1, top1) and torch.equal(report.topk, topk)
    assert report.num_experts == 4 and report.top_k == 2 and report.expert_names == ["0", "1", "2", "3"]
    from transformers import AutoModelForCausalLM

    names = [name for _, name, _ in find_routers(AutoModelForCausalLM.from_pretrained(str(model_dir)), 4, 32)]
    assert names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]  # never the shared expert's gate


def test_inspect_plot_writes_a_png(mixtral_moe, tmp_path):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    png = tmp_path / "routing.png"
    result = CliRunner().invoke(cli, ["inspect", str(mixtral_moe), "--prompts", str(prompts), "--plot", str(png),
                                      "--quiet", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeforge: error:"), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_inspect_errors_are_one_line(mixtral_moe, models, tmp_path, monkeypatch):
    runner = CliRunner()
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    cases = []
    bad_ext = tmp_path / "p.csv"
    bad_ext.write_text("x")
    cases.append((["--prompts", str(bad_ext)], "expected a .txt"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('"fine"\n{"text": \n')
    cases.append((["--prompts", str(bad_json)], "bad.jsonl:2: not valid JSON"))
    bad_label = tmp_path / "label.jsonl"
    bad_label.write_text('{"text": "x", "expert": 7}\n')
    cases.append((["--prompts", str(bad_label)], "label.jsonl:1: expert 7 is not one of 0 (code), 1 (story)"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases.append((["--prompts", str(empty)], "has no prompts"))
    cases.append((["--prompts", str(tmp_path / "missing.txt")], "cannot read"))
    cases.append((["--prompts", str(good), "--device", "gpu"], "--device: 'gpu' is not one of"))
    for args, fragment in cases:
        _one_line_error(runner.invoke(cli, ["inspect", str(mixtral_moe), *args]), 2, fragment)
    # a dense model is not an MoE
    _one_line_error(runner.invoke(cli, ["inspect", models["base"], "--prompts", str(good)]), 2, "not an MoE checkpoint")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _one_line_error(runner.invoke(cli, ["inspect", str(mixtral_moe), "--prompts", str(good), "--plot",
                                        str(tmp_path / "x.png")]), 2, "pip install moeforge[plot]")
    assert not (tmp_path / "x.png").exists()
