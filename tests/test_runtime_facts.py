"""Every layout's runtime facts reach the user: a build warning naming each runtime that will compute
something else (or not load the model), and the Runtimes table of the model card. The facts themselves
are measured by benchmarks/runtimes.py (docs/runtimes.md) and checked against llama.cpp's converter in
tests/test_llamacpp_convert.py."""
import json
import logging

import pytest

import moeforge
from moeforge.errors import ConfigError
from moeforge.layouts import LAYOUTS
from moeforge.layouts.runtimes import DIFFERS, EXACT, FAILS, LLAMA_CPP, MEASURED, TRANSFORMERS, VLLM


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory):
    from moeforge.toy import make_dense

    path = tmp_path_factory.mktemp("qwen3") / "base"
    make_dense(path, family="qwen3", seed=3)
    return str(path)


def _build(base, out, layout, caplog, n_routed=4, n_shared=0, **extra):
    cfg = {"base_model": base, "gate_mode": "random", "dtype": "float32", "architecture": layout,
           "experts": [{"source_model": base}] * n_routed, **extra}
    if n_shared:
        cfg["shared_experts"] = [{"source_model": base, "residual_scale": 0.0}] * n_shared
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    card = (out / "README.md").read_text()
    rows = {}
    for line in card.split("## Runtimes", 1)[1].split("## Configuration", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in (TRANSFORMERS, VLLM, LLAMA_CPP):
            rows[cells[0]] = cells
    return warned, card, rows, json.loads((out / "config.json").read_text())


# layout, shared experts, extra config -> llama.cpp's verdict (transformers and vLLM: exact throughout)
CASES = [
    ("mixtral", 0, {}, EXACT),
    ("mixtral", 0, {"experts_per_token": 2, "n_routed": 3}, EXACT),  # no power-of-two limit
    ("qwen", 1, {}, DIFFERS),
    ("qwen", 2, {"renormalize": True}, DIFFERS),
    ("qwen", 1, {"renormalize": False}, EXACT),
    ("qwen", 1, {"n_routed": 2}, EXACT),  # top-2 of 2: renormalising changes nothing
    ("qwen3", 0, {}, EXACT),
    ("qwen3", 0, {"renormalize": False}, DIFFERS),
    ("deepseek", 0, {}, FAILS),
    ("deepseek", 0, {"renormalize": False}, FAILS),
    ("deepseek", 1, {}, DIFFERS),
    ("deepseek", 2, {"renormalize": False}, EXACT),
]


@pytest.mark.parametrize("layout,n_shared,extra,llama_cpp", CASES,
                         ids=[f"{c[0]}-{c[1]}shared-{c[2]}" for c in CASES])
def test_build_warns_and_card_tells(models, qwen3_base, tmp_path, caplog, layout, n_shared, extra, llama_cpp):
    extra = dict(extra)
    n_routed = extra.pop("n_routed", 4)
    base = qwen3_base if layout == "qwen3" else models["base"]
    warned, card, rows, config = _build(base, tmp_path / "out", layout, caplog, n_routed, n_shared, **extra)

    about_llama = [w for w in warned if w.startswith(LLAMA_CPP)]
    assert not [w for w in warned if w.startswith((TRANSFORMERS, VLLM))]
    assert set(rows) == {TRANSFORMERS, VLLM, LLAMA_CPP}
    for runtime in (TRANSFORMERS, VLLM):
        assert rows[runtime][2] == EXACT and rows[runtime][3] == MEASURED[runtime]
    assert rows[LLAMA_CPP][2].startswith(llama_cpp)
    assert rows[LLAMA_CPP][3] == MEASURED[LLAMA_CPP]
    if llama_cpp == EXACT:
        assert about_llama == []
        assert "Every runtime below computes what transformers computes" in card
    else:
        assert len(about_llama) == 1 and f" {llama_cpp} for this model: " in about_llama[0]
        assert "**Not the same model in llama.cpp**" in card
    if layout != "mixtral":
        assert config["norm_topk_prob"] is extra.get("renormalize", True)
    if extra.get("renormalize") is False:
        assert "renormalize: false" in (tmp_path / "out" / "moeforge_config.yml").read_text()


def test_deepseek_warning_says_how_to_run_in_llama_cpp(models, tmp_path, caplog):
    warned, _, rows, config = _build(models["base"], tmp_path / "out", "deepseek", caplog)
    assert config["n_shared_experts"] is None  # what DeepSeek's code, transformers and vLLM read as none
    (line,) = [w for w in warned if w.startswith(LLAMA_CPP)]
    assert "shared-expert tensors" in line and "residual_scale: 0" in line


def test_mixtral_refuses_renormalize_false(models, tmp_path):
    cfg = {"base_model": models["base"], "gate_mode": "random", "architecture": "mixtral", "renormalize": False,
           "experts": [{"source_model": models["base"]}] * 2}
    with pytest.raises(ConfigError, match="mixtral always renormalises"):
        moeforge.build(cfg, tmp_path / "out", quiet=True, allow_all_same=True)
    assert not (tmp_path / "out").exists()


def test_every_layout_declares_every_runtime():
    for layout in LAYOUTS:
        assert [r.name for r in layout.runtimes] == [TRANSFORMERS, VLLM, LLAMA_CPP], layout.name
