"""Router weights follow mergekit-moe's math, checked against straightforward re-implementations here."""
import pytest
import torch
from conftest import CODE, STORY, expert_config
from helpers import read_tensors

import moeforge


def _routers(out, layers=2):
    t = read_tensors(out)
    return torch.stack([t[f"model.layers.{l}.block_sparse_moe.gate.weight"] for l in range(layers)])


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _reference_hidden(base, prompts, average):
    """One prompt at a time, no padding: the residual stream entering each layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    vecs = []
    for p in prompts:
        ids = tok(tok.bos_token + p, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            hs = model(**ids, output_hidden_states=True).hidden_states
        assert torch.allclose(hs[0][0], model.get_input_embeddings()(ids["input_ids"])[0])
        stacked = torch.stack(hs[:-1])[:, 0]  # (layers, tokens, hidden)
        vecs.append(stacked.mean(1) if average else stacked[:, -1])
    return torch.stack(vecs).mean(0)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates(models, out, mode):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode=mode)
    cfg["experts"][0]["negative_prompts"] = ["Once upon"]
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32", prompt_batch_size=2)
    avg = mode == "hidden_avg"
    expected = torch.stack([
        _unit(_reference_hidden(models["base"], CODE, avg) - _reference_hidden(models["base"], ["Once upon"], avg)),
        _unit(_reference_hidden(models["base"], STORY, avg)),
    ], dim=1)
    assert torch.allclose(_routers(out), expected, atol=1e-5)


def test_cheap_embed_gates(models, out):
    from transformers import AutoTokenizer

    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="cheap_embed")
    cfg["experts"][1]["negative_prompts"] = ["def add"]
    moeforge.build(cfg, out, quiet=True)
    tok = AutoTokenizer.from_pretrained(models["base"])
    embed = read_tensors(models["base"])["model.embed_tokens.weight"]

    def enc(prompts):
        ids = [i for p in prompts for i in tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]]
        return _unit(embed[ids].sum(0))

    expected = torch.stack([_unit(enc(CODE)), _unit(enc(STORY) - enc(["def add"]))])
    got = _routers(out)
    for layer in range(2):
        assert torch.allclose(got[layer], expected, atol=1e-6)


def test_random_gates_match_mergekit_draws(models, out, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    moeforge.build(cfg, out, quiet=True, random_seed=42)
    torch.manual_seed(42)  # mergekit-moe: set_seed(seed), then one randn of (layers, experts, hidden)
    assert torch.equal(_routers(out), torch.randn(2, 2, 32))

    cfg["gate_mode"] = "uniform_random"
    moeforge.build(cfg, tmp_path / "u", quiet=True, random_seed=42)
    torch.manual_seed(42)
    scale = (1 / 32) ** 0.5
    assert torch.equal(_routers(tmp_path / "u"), torch.rand(2, 2, 32) * 2 * scale - scale)
    assert _routers(tmp_path / "u").abs().max() <= scale


def test_hidden_gates_route_prompts_to_their_expert(models, out):
    """With hidden gates, each expert's own prompts score highest on its row in every layer."""
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True, hidden_dtype="float32")
    routers = _routers(out)
    for e, prompts in enumerate((CODE, STORY)):
        for layer in range(2):
            h = _unit(_reference_hidden(models["base"], prompts, False)[layer])
            assert (routers[layer] @ h).argmax().item() == e
