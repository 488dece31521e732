"""DeepSeek-MoE outputs load through the configuration/modeling code written beside their weights
(`trust_remote_code=True`, no Hub): identical experts reproduce the dense base, different experts match an
independent forward, and generation, save_pretrained, RoPE scaling, dense layers and tied embeddings work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors
from safetensors.torch import save_file

import moeforge

TEXTS = ("Write a Python function that sorts", "Once upon a time there")
CODE_DIR = Path(moeforge.__file__).parent / "layouts" / "deepseek_code"
CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")


def _build(models, out, experts, shared=0, residual_scale=0.0, **extra):
    names = ("code", "story")[:shared]
    cfg = expert_config(models["base"], [models[e] for e in experts], gate_mode="random", architecture="deepseek",
                        shared_experts=[{"source_model": models[n], "residual_scale": residual_scale} for n in names]
                        or None, **extra)
    moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=3)
    return json.loads((out / "config.json").read_text())


def _remote(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "DeepseekForCausalLM"
    return model.eval()


def _mlp(x, t, prefix):
    g, u, d = (t[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T


class _ReferenceMoE(torch.nn.Module):
    """DeepSeek-MoE v1's MoE block from its description, on plain tensors: softmax scores, top-k, weights
    renormalised when norm_topk_prob (top-1 too), every expert run densely, the ungated shared MLP added."""

    def __init__(self, tensors, layer, config):
        super().__init__()
        self.t, self.p, self.c = tensors, f"model.layers.{layer}.mlp", config

    def forward(self, x):
        k = self.c["num_experts_per_tok"]
        w, idx = torch.topk(torch.softmax(x @ self.t[f"{self.p}.gate.weight"].T, dim=-1), k, dim=-1)
        if self.c["norm_topk_prob"]:
            w = w / w.sum(-1, keepdim=True)
        experts = torch.stack([_mlp(x, self.t, f"{self.p}.experts.{e}") for e in range(self.c["n_routed_experts"])], -2)
        out = (torch.gather(experts, -2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1])) * w.unsqueeze(-1)).sum(-2)
        if self.c.get("n_shared_experts"):
            out = out + _mlp(x, self.t, f"{self.p}.shared_experts")
        return out


def reference_logits(out, base_dir, texts=TEXTS):
    """The base's transformers Llama with the output's tensors and reference MoE blocks in every layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    t, config = read_tensors(out), json.loads((out / "config.json").read_text())
    missing, unexpected = model.load_state_dict({k: v for k, v in t.items() if ".mlp." not in k}, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)
    for layer, block in enumerate(model.model.layers):
        block.mlp = _ReferenceMoE(t, layer, config)
    tok = AutoTokenizer.from_pretrained(base_dir)
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_identical_experts_reproduce_the_base(models, out, shared):
    config = _build(models, out, ["base"] * 4, shared=shared)
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert config["n_routed_experts"] == 4 and config["n_shared_experts"] == (shared or None)
    assert config["rope_theta"] == 10000.0 and "rope_parameters" not in config  # DeepSeek's code reads rope_theta
    assert config["auto_map"] == {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                                  "AutoModel": "modeling_deepseek.DeepseekModel",
                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}
    for name in CODE_FILES:
        assert (out / name).read_bytes() == (CODE_DIR / name).read_bytes()
    assert ("model.layers.1.mlp.shared_experts.up_proj.weight" in read_tensors(out)) == bool(shared)
    assert hasattr(_remote(out).model.layers[1].mlp, "shared_experts") == bool(shared)
    assert (logits(out, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4


@pytest.mark.parametrize("shared, top_k", [(0, 2), (1, 2), (2, 2), (1, 1)])
def test_different_experts_match_the_reference_forward(models, out, shared, top_k):
    _build(models, out, ["code", "story", "base"], shared=shared, residual_scale=1.0, experts_per_token=top_k)
    if shared == 1:
        assert torch.equal(read_tensors(out)["model.layers.0.mlp.shared_experts.up_proj.weight"],
                           read_tensors(models["code"])["model.layers.0.mlp.up_proj.weight"])
    got = logits(out, TEXTS)
    assert (got - reference_logits(out, models["base"])).abs().max() <= 1e-4
    assert (got - logits(models["base"], TEXTS)).abs().max() > 1e-3  # the experts and shared MLPs matter


def test_one_expert_per_token_reproduces_the_base(models, out):
    """norm_topk_prob renormalises top-1 as well (as vLLM does), so identical experts give the base's logits at
    top-1 too; deepseek-moe-16b's own code would scale the one chosen expert by its softmax score."""
    _build(models, out, ["base"] * 4, experts_per_token=1)
    assert (logits(out, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4


_OFFLINE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, resaved = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
prompt = tok(["Once upon"], return_tensors="pt")
generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
ids = prompt["input_ids"]
with torch.no_grad():
    for _ in range(6):
        ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
model.save_pretrained(resaved)
print(json.dumps({"generated": generated.tolist(), "greedy": ids.tolist()}))
"""


def test_loads_offline_generates_and_resaves(models, out, tmp_path):
    """A fresh process with no Hub access and an empty module cache: load, generate with the KV cache (the same
    tokens as recomputing every step), save_pretrained (the same tensor names, code and auto_map)."""
    _build(models, out, ["code", "story"], shared=1, residual_scale=1.0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", _OFFLINE, str(out), str(tmp_path / "resaved")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["generated"] == result["greedy"] and len(result["generated"][0]) > 6
    resaved = tmp_path / "resaved"
    assert set(read_tensors(resaved)) == set(read_tensors(out))
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == json.loads((out / "config.json").read_text())["auto_map"]
    shutil.copy(out / "tokenizer.json", resaved)
    shutil.copy(out / "tokenizer_config.json", resaved)
    assert (logits(resaved, TEXTS) - logits(out, TEXTS)).abs().max() <= 1e-6


def _rewrite(src: Path, dst: Path, config_changes: dict, tensors=None) -> Path:
    """A copy of an output with config.json keys changed and, optionally, other tensors (one shard)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    if tensors is not None:
        for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.safetensors.index.json")):
            f.unlink()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def test_n_shared_experts_zero_and_null_mean_none(models, out, tmp_path):
    _build(models, out, ["code", "story"])
    zero = _rewrite(out, tmp_path / "zero", {"n_shared_experts": 0})
    assert not hasattr(_remote(zero).model.layers[0].mlp, "shared_experts")
    assert torch.equal(logits(zero, TEXTS), logits(out, TEXTS))


@pytest.mark.parametrize("first_k, freq, dense", [(1, 1, {0}), (0, 2, {1})])
def test_dense_layers_from_first_k_dense_replace_and_moe_layer_freq(models, out, tmp_path, first_k, freq, dense):
    """Layers below first_k_dense_replace, and off the moe_layer_freq stride, are plain MLPs (mlp.*_proj)."""
    _build(models, out, ["base"] * 2)
    t = read_tensors(out)
    for layer in dense:
        prefix = f"model.layers.{layer}.mlp."
        for role in ("gate", "up", "down"):
            t[f"{prefix}{role}_proj.weight"] = t[f"{prefix}experts.0.{role}_proj.weight"]
        t = {k: v for k, v in t.items() if not k.startswith((prefix + "experts.", prefix + "gate."))}
    d = _rewrite(out, tmp_path / "dense", {"first_k_dense_replace": first_k, "moe_layer_freq": freq}, t)
    kinds = [type(block.mlp).__name__ for block in _remote(d).model.layers]
    assert kinds == ["DeepseekMLP" if i in dense else "DeepseekMoE" for i in range(2)]
    assert (logits(d, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def steep_base(tmp_path_factory):
    """Weights large enough for the RoPE frequencies to change the logits."""
    from moeforge.toy import make_dense

    path = tmp_path_factory.mktemp("steep") / "base"
    make_dense(path, seed=4, initializer_range=0.3)
    return path


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_matches_transformers_llama(steep_base, out, tmp_path, kind):
    """The output with linear / dynamic-NTK RoPE scaling (what deepseek-moe-16b supports) computes what
    transformers' Llama computes with the same scaling, beyond max_position_embeddings for dynamic."""
    base = str(steep_base)
    moeforge.build(expert_config(base, [base] * 2, gate_mode="random", architecture="deepseek"), out, quiet=True,
                   allow_all_same=True)
    theta = json.loads((out / "config.json").read_text())["rope_theta"]
    scaled = _rewrite(out, tmp_path / "scaled", {"rope_scaling": {"type": kind, "factor": 3.0},
                                                 "max_position_embeddings": 4})
    dense = _rewrite(steep_base, tmp_path / "dense", {"max_position_embeddings": 4, "rope_parameters": {
        "rope_type": kind, "factor": 3.0, "rope_theta": theta}})
    expected = logits(dense, TEXTS)
    assert (expected - logits(base, TEXTS)).abs().max() > 1e-2  # the scaling changes the logits
    assert (logits(scaled, TEXTS) - expected).abs().max() <= 1e-4


def test_tied_embeddings(models, out, tmp_path):
    """A base whose lm_head is its embedding matrix: the output ties them too (tie_word_embeddings)."""
    tied = tmp_path / "tied"
    t = {k: v for k, v in read_tensors(models["base"]).items() if k != "lm_head.weight"}
    _rewrite(Path(models["base"]), tied, {"tie_word_embeddings": True}, t)
    cfg = expert_config(str(tied), [str(tied)] * 2, gate_mode="random", architecture="deepseek")
    moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    assert "lm_head.weight" not in read_tensors(out)
    model = _remote(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (logits(out, TEXTS) - logits(tied, TEXTS)).abs().max() <= 1e-4


def test_add_expert_keeps_the_code(models, out, tmp_path):
    """moeforge add-expert on a DeepSeek output: the code comes along and the result still loads and, with an
    identical expert added, reproduces the base."""
    from moeforge.edit import add_expert

    _build(models, out, ["base"] * 2, shared=1)
    add_expert(out, models["base"], out_dir=tmp_path / "three", random_seed=5, quiet=True)
    three = tmp_path / "three"
    assert json.loads((three / "config.json").read_text())["n_routed_experts"] == 3
    assert all((three / name).read_bytes() == (CODE_DIR / name).read_bytes() for name in CODE_FILES)
    assert len(_remote(three).model.layers[0].mlp.experts) == 3
    assert (logits(three, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4
