"""Several shared experts: concatenated along the intermediate dimension, the shared MLP computes exactly the
sum of their outputs (DeepSeek's n_shared_experts, Qwen2-MoE's one gated shared expert)."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors
from test_layouts import TEXTS

import moeforge

SCALES = (1.0, 0.5, 2.0)


def _mlp(x, t, prefix):
    g, u, d = (t[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T


def _shared(models, prompts=False):
    names = ("code", "story", "base")
    return [{"source_model": models[n], "residual_scale": s, **({"positive_prompts": [f"{n} prompt"]} if prompts else {})}
            for n, s in zip(names, SCALES)]


def _assert_sum_of_outputs(got, prefix, models, layer):
    """The concatenated MLP, run on random inputs, equals the sum of each shared expert's scaled MLP."""
    x = torch.randn(5, 32)
    dense = [read_tensors(models[n]) for n in ("code", "story", "base")]
    expected = sum(s * _mlp(x, t, f"model.layers.{layer}.mlp") for s, t in zip(SCALES, dense))
    assert torch.allclose(_mlp(x, got, prefix), expected, atol=1e-5)
    # and the bytes: gate/up rows and down columns are the sources', side by side
    assert torch.equal(got[f"{prefix}.up_proj.weight"],
                       torch.cat([t[f"model.layers.{layer}.mlp.up_proj.weight"] for t in dense]))
    assert torch.equal(got[f"{prefix}.down_proj.weight"],
                       torch.cat([s * t[f"model.layers.{layer}.mlp.down_proj.weight"] for s, t in zip(SCALES, dense)], 1))


def test_deepseek_concatenates_shared_experts(models, out):
    cfg = expert_config(models["base"], [models["base"]] * 2, gate_mode="random", architecture="deepseek",
                        shared_experts=_shared(models))
    moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    config, got = json.loads((out / "config.json").read_text()), read_tensors(out)
    assert config["n_shared_experts"] == 3 and config["moe_intermediate_size"] == 64
    assert got["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (192, 32)
    for layer in range(2):
        _assert_sum_of_outputs(got, f"model.layers.{layer}.mlp.shared_experts", models, layer)
    # the whole model: routed copies of the base plus the three shared MLPs added
    with_shared = logits(out, TEXTS)
    cfg["shared_experts"] = [dict(e, residual_scale=0.0) for e in cfg["shared_experts"]]
    moeforge.build(cfg, out.parent / "silent", quiet=True, allow_all_same=True)
    assert (logits(out.parent / "silent", TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4
    assert (with_shared - logits(models["base"], TEXTS)).abs().max() > 1e-3


def test_qwen2_moe_joins_shared_experts_under_one_gate(models, out, tmp_path):
    from transformers import Qwen2MoeForCausalLM

    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="hidden", architecture="qwen",
                        shared_experts=_shared(models, prompts=True))
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32")
    model, info = Qwen2MoeForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == 3 * 64
    got = read_tensors(out)
    _assert_sum_of_outputs(got, "model.layers.1.mlp.shared_expert", models, 1)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(model.model.layers[0].mlp.shared_expert(x), _mlp(x, got, "model.layers.0.mlp.shared_expert"),
                              atol=1e-5)
    # one gate row, from all the shared experts' prompts together
    joined = dict(cfg, shared_experts=[{"source_model": models["base"],
                                        "positive_prompts": [p for e in cfg["shared_experts"] for p in e["positive_prompts"]]}])
    moeforge.build(joined, tmp_path / "joined", quiet=True, hidden_dtype="float32")
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    assert torch.allclose(got[gate], read_tensors(tmp_path / "joined")[gate], atol=1e-6)


def test_qwen2_moe_with_silent_shared_experts_reproduces_the_base(models, out):
    cfg = expert_config(models["base"], [models["base"]] * 2, gate_mode="random", architecture="qwen",
                        shared_experts=[dict(e, residual_scale=0.0) for e in _shared(models, prompts=True)])
    moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    assert (logits(out, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4


@pytest.mark.parametrize("noisy", [False, True])
def test_concatenation_streams_in_small_chunks(models, noisy):
    """Columns joined row block by row block give the same bytes however small the chunks (bounded memory)."""
    from moeforge.plan.tensors import FromConcat, FromSource
    from moeforge.sources.checkpoint import Checkpoint

    code, story = Checkpoint(models["code"]), Checkpoint(models["story"])
    name = "model.layers.0.mlp.down_proj.weight"
    parts = (FromSource(code, name, scale=0.5), FromSource(story, name, noise_scale=0.1 if noisy else None, noise_seed=3))
    joined = FromConcat(parts, dim=1)
    whole = torch.cat([torch.cat(list(p.tensors(1 << 30))) for p in parts], dim=1)
    for chunk_bytes in (1, 300, 5000, 1 << 30):
        chunks = list(joined.tensors(chunk_bytes))
        assert torch.equal(torch.cat(chunks), whole)
        if chunk_bytes == 300:
            assert len(chunks) > 10  # really chunked
    assert joined.shape == (32, 128) and whole.shape == joined.shape
    rows = FromConcat(parts, dim=0)
    assert torch.equal(torch.cat(list(rows.tensors(300))), torch.cat([whole[:, :64], whole[:, 64:]]))
