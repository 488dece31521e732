"""Qwen2-MoE and Qwen3-MoE outputs: the same equivalence proof as Mixtral (DeepSeek-MoE: test_deepseek.py),
plus refusals and layout inference."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors

import moeforge
from moeforge.errors import ConfigError, SourceError

TEXTS = ("Write a Python function that sorts", "Once upon a time there")


def _shared(model, residual_scale=0.0, prompts=("Solve for x",)):
    entry = {"source_model": model, "residual_scale": residual_scale}
    if prompts:
        entry["positive_prompts"] = list(prompts)
    return [entry]


def _load_info(cls_name, out):
    import transformers

    model, info = getattr(transformers, cls_name).from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


@pytest.mark.parametrize("gate_mode", ["hidden", "random"])
def test_qwen2_moe_from_llama_reproduces_the_base(models, out, tmp_path, gate_mode):
    cfg = expert_config(models["base"], [models["base"]] * 4, gate_mode=gate_mode, architecture="qwen",
                        shared_experts=_shared(models["code"]))
    result = moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=0)
    model = _load_info("Qwen2MoeForCausalLM", out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts"] == 4 and config["norm_topk_prob"] is True
    names = set(read_tensors(out))
    assert "model.layers.0.self_attn.q_proj.bias" in names  # zero biases added for a Llama input
    assert torch.count_nonzero(read_tensors(out)["model.layers.1.self_attn.k_proj.bias"]) == 0
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(read_tensors(tmp_path / "resaved")) == names
    assert (logits(out, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4
    assert result.layout == "qwen" and not result.layout_inferred


def test_qwen2_input_infers_qwen_and_keeps_its_biases(models, qwen_models, out):
    q = qwen_models["qwen2"]
    cfg = expert_config(q, [q] * 2, gate_mode="cheap_embed", shared_experts=_shared(q))
    result = moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    assert result.layout == "qwen" and result.layout_inferred
    _load_info("Qwen2MoeForCausalLM", out)
    assert torch.equal(read_tensors(out)["model.layers.0.self_attn.q_proj.bias"],
                       read_tensors(q)["model.layers.0.self_attn.q_proj.bias"])
    assert (logits(out, TEXTS) - logits(q, TEXTS)).abs().max() <= 1e-4


def test_qwen3_moe_reproduces_the_base(qwen_models, out, tmp_path):
    q = qwen_models["qwen3"]
    result = moeforge.build(expert_config(q, [q] * 4, gate_mode="hidden"), out, quiet=True, allow_all_same=True)
    assert result.layout == "qwen3" and result.layout_inferred
    model = _load_info("Qwen3MoeForCausalLM", out)
    assert "model.layers.0.self_attn.q_norm.weight" in read_tensors(out)
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(read_tensors(tmp_path / "resaved")) == set(read_tensors(out))
    assert (logits(out, TEXTS) - logits(q, TEXTS)).abs().max() <= 1e-4


def test_inference_order_follows_mergekit(models, out, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random",
                        shared_experts=_shared(models["base"], prompts=()))
    assert moeforge.build(cfg, out, quiet=True).layout == "deepseek"  # shared and ungated: DeepSeek first
    cfg["shared_experts"] = _shared(models["base"])
    cfg["gate_mode"] = "hidden"
    assert moeforge.build(cfg, tmp_path / "q", quiet=True).layout == "qwen"  # gated shared expert: Qwen


@pytest.mark.parametrize(
    "arch, family, shared, needle",
    [
        ("mixtral", "qwen2", 0, "mixtral takes llama/mistral/phi3 inputs, not qwen2; layouts that accept these inputs: qwen"),
        ("qwen", "qwen3", 1, "qwen takes llama/mistral/qwen2/phi3 inputs, not qwen3; layouts that accept these inputs: qwen3"),
        ("mixtral", "llama", 1, "mixtral has no shared experts"),
        ("qwen3", "qwen3", 1, "qwen3 has no shared experts"),
        ("qwen", "llama", 0, "qwen needs 1 shared expert"),
        ("dbrx", "llama", 0, "'dbrx' is not an output layout"),
    ],
)
def test_layout_refusals(models, qwen_models, out, arch, family, shared, needle):
    src = {"llama": models["base"], **qwen_models}[family]
    cfg = expert_config(src, [src, src], gate_mode="random", architecture=arch,
                        shared_experts=_shared(src) if shared else None)
    with pytest.raises(ConfigError) as e:
        moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    assert needle in str(e.value)
    assert not out.exists()


def test_mixing_families_needs_allow_crimes(models, out):
    cfg = expert_config(models["base"], [models["code"], models["mistral"]], gate_mode="random")
    with pytest.raises(SourceError, match="--allow-crimes"):
        moeforge.build(cfg, out, quiet=True)
    moeforge.build(cfg, out, quiet=True, allow_crimes=True)
    assert torch.equal(read_tensors(out)["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                       read_tensors(models["mistral"])["model.layers.0.mlp.gate_proj.weight"])


def test_lora_experts_are_merged_on_the_fly(models, out, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}

    adapter = str(tmp_path / "adapter")
    cfg = expert_config(models["base"], [f"{models['base']}+{adapter}", models["code"]], gate_mode="random")
    cfg["experts"].append({"source_model": {"model": models["base"], "lora": adapter}})
    moeforge.build(cfg, out, quiet=True)
    got = read_tensors(out)
    for e in (0, 2):
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            want = merged[f"model.layers.1.mlp.{proj}.weight"]
            assert torch.allclose(got[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"], want, atol=1e-6)
    base = read_tensors(models["base"])
    assert not torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_parameter_counts(models, out):
    cfg = expert_config(models["base"], [models["base"]] * 4, gate_mode="random", experts_per_token=1)
    result = moeforge.build(cfg, out, quiet=True, allow_all_same=True)
    base = sum(t.numel() for t in read_tensors(models["base"]).values())
    expert = sum(t.numel() for n, t in read_tensors(models["base"]).items() if ".mlp." in n)
    router = 2 * 4 * 32
    assert result.total_params == base + 3 * expert + router
    assert result.active_params == base + router
