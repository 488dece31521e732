"""Phi-3 inputs (fused tensors split on read) in every layout that expresses their attention; Gemma and
Gemma 2 refused with the features no layout has."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors

import moeforge
from moeforge.errors import ConfigError

TEXTS = ("Write a Python function that sorts a list", "Once upon a time there was a dragon")
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4,
            "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0]}


@pytest.fixture(scope="session")
def fam_models(tmp_path_factory):
    from moeforge.toy import make_dense

    root = tmp_path_factory.mktemp("families")
    specs = {
        "phi3_window": dict(family="phi3", seed=5, sliding_window=4),  # a window shorter than the texts
        # texts longer than 4 tokens: long factors; weights large enough for RoPE to matter (see the test)
        "phi3_longrope": dict(family="phi3", seed=6, rope_parameters=LONGROPE, initializer_range=0.3),
        "phi3": dict(family="phi3", seed=7),
        "phi3_b": dict(family="phi3", seed=8),
        "phi3_partial": dict(family="phi3", seed=9, partial_rotary_factor=0.5),
        "gemma": dict(family="gemma", seed=1),
        "gemma2": dict(family="gemma2", seed=1),
    }
    for name, spec in specs.items():
        make_dense(root / name, **spec)
    return {name: str(root / name) for name in specs}


def _copies(src, arch, n=4, **extra):
    cfg = expert_config(src, [src] * n, gate_mode="random", architecture=arch, **extra)
    if arch == "qwen":
        cfg["shared_experts"] = [{"source_model": src, "residual_scale": 0.0}]
    return cfg


@pytest.mark.parametrize("model, arch", [("phi3_window", "mixtral"), ("phi3_longrope", "mixtral"),
                                         ("phi3_longrope", "qwen")])
def test_phi3_copies_reproduce_phi3(fam_models, out, model, arch):
    """Phi3ForCausalLM's logits from a Mixtral / Qwen2-MoE whose experts are the Phi-3's own split MLP."""
    import transformers

    src = fam_models[model]
    moeforge.build(_copies(src, arch), out, quiet=True, allow_all_same=True, random_seed=0)
    cls = {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM"}[arch]
    _, info = getattr(transformers, cls).from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = json.loads((out / "config.json").read_text())
    assert (config["sliding_window"] or None) == (4 if model == "phi3_window" else None)
    if model == "phi3_longrope":
        assert {k: config["rope_parameters"][k] for k in LONGROPE} == LONGROPE
    assert (logits(out, TEXTS) - logits(src, TEXTS)).abs().max() <= 1e-4


def test_the_phi3_equivalences_depend_on_window_and_rope(fam_models):
    """Guards the test above: Phi-3 without its window or its LongRoPE computes something else."""
    import transformers

    def phi3_logits(path, **config):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.Phi3ForCausalLM.from_pretrained(
            path, config=transformers.AutoConfig.from_pretrained(path, **config)).eval()
        batch = tok(list(TEXTS), return_tensors="pt", padding=True)
        assert batch["attention_mask"].sum(1).min() > 4  # past the window and the original context
        with torch.no_grad():
            return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)

    window, rope = fam_models["phi3_window"], fam_models["phi3_longrope"]
    assert (phi3_logits(window) - phi3_logits(window, sliding_window=None)).abs().max() > 0.1
    default = {"rope_type": "default", "rope_theta": 10000.0}
    assert (phi3_logits(rope) - phi3_logits(rope, rope_parameters=default)).abs().max() > 0.1


def test_phi3_fused_tensors_are_split_bit_for_bit(fam_models, out):
    moeforge.build(expert_config(fam_models["phi3"], [fam_models["phi3"], fam_models["phi3_b"]], gate_mode="random"),
                   out, quiet=True)
    got, base, b = read_tensors(out), read_tensors(fam_models["phi3"]), read_tensors(fam_models["phi3_b"])
    qkv = base["model.layers.1.self_attn.qkv_proj.weight"]  # 4 heads x 8 + 2 x (2 kv heads x 8) rows
    assert torch.equal(torch.cat([got[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]), qkv)
    assert got["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)
    gate_up = b["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.1.w1.weight"], gate_up[:64])
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.1.w3.weight"], gate_up[64:])
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in got)


def test_phi3_to_deepseek(fam_models, out):
    src = fam_models["phi3"]
    moeforge.build(_copies(src, "deepseek"), out, quiet=True, allow_all_same=True)
    assert (logits(out, TEXTS) - logits(src, TEXTS)).abs().max() <= 1e-4


@pytest.mark.parametrize("model, arch, needle", [
    ("phi3_window", "qwen", "qwen cannot express sliding_window (sliding-window attention); layouts that accept these inputs: mixtral"),
    ("phi3_window", "deepseek", "deepseek cannot express sliding_window"),
    ("phi3_longrope", "deepseek", "deepseek cannot express rope_scaling"),
    ("phi3_partial", None, "no output layout can express phi3 inputs with partial_rotary (rotary embeddings on part of each head"),
    ("gemma", None, "no output layout can express gemma inputs with embed_scale (embeddings multiplied by sqrt(hidden_size)), gelu_mlp (a GeGLU MLP"),
    ("gemma", "mixtral", "offset_norm (RMSNorm scaled by (1 + weight))"),
    ("gemma2", "qwen", "softcapping (attention and final logit soft-capping)"),
    ("gemma2", None, "sandwich_norm (pre- and post-feed-forward norms)"),
])
def test_refusals_name_the_missing_feature(fam_models, out, model, arch, needle):
    src = fam_models[model]
    cfg = _copies(src, arch or "mixtral", n=2)
    if arch is None:
        del cfg["architecture"]
    with pytest.raises(ConfigError) as e:
        moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_phi3_lora_on_fused_modules_is_split_too(fam_models, out, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(fam_models["phi3"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["gate_up_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload().state_dict()["model.layers.1.mlp.gate_up_proj.weight"]
    src = fam_models["phi3"]
    moeforge.build(expert_config(src, [f"{src}+{tmp_path / 'adapter'}", fam_models["phi3_b"]], gate_mode="random"),
                   out, quiet=True)
    got = read_tensors(out)
    assert torch.allclose(got["model.layers.1.block_sparse_moe.experts.0.w1.weight"], merged[:64], atol=1e-6)
    assert torch.allclose(got["model.layers.1.block_sparse_moe.experts.0.w3.weight"], merged[64:], atol=1e-6)
