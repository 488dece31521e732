"""Qwen2-MoE (Qwen2MoeForCausalLM): routed experts plus one shared expert scaled by a sigmoid gate.

Its attention always has q/k/v biases: inputs without them get zeros (same function). Several shared
experts are concatenated into the one shared MLP (the sum of their outputs) under one sigmoid gate.
"""
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.runtimes import LLAMA_CPP, LLAMA_CPP_IGNORES_NORM_TOPK, TRANSFORMERS, VLLM, Runtime

QWEN_EXPERT = {
    "gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
}


def qwen_moe_keys(shape: MoEShape) -> dict:
    """Keys Qwen2-MoE and Qwen3-MoE share: every layer sparse, renormalised top-k."""
    return {
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.experts_per_token,
        "moe_intermediate_size": shape.intermediate_size,
        "intermediate_size": shape.intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": shape.renormalize,  # true: identical experts reproduce the dense MLP
    }


def _moe_config(shape: MoEShape) -> dict:
    return {
        **qwen_moe_keys(shape),
        "shared_expert_intermediate_size": shape.shared_intermediate_size,
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
    }


QWEN2_MOE = Layout(
    name="qwen",
    architectures=("Qwen2MoeForCausalLM",),
    families=("llama", "mistral", "qwen2", "phi3"),
    features=frozenset({"qkv_bias", "rope_scaling"}),
    required_features=frozenset({"qkv_bias"}),
    expert=QWEN_EXPERT,
    router="model.layers.{layer}.mlp.gate.weight",
    moe_config=_moe_config,
    model_type="qwen2_moe",
    config_class="Qwen2MoeConfig",
    key_aliases={"num_experts": ("num_local_experts",)},
    min_shared_experts=1,
    max_shared_experts=None,
    dense_model_type="qwen2",
    shared_expert={
        "gate": "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
        "up": "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
        "down": "model.layers.{layer}.mlp.shared_expert.down_proj.weight",
    },
    shared_router="model.layers.{layer}.mlp.shared_expert_gate.weight",
    runtimes=(
        Runtime(TRANSFORMERS, "Qwen2MoeForCausalLM"),
        Runtime(VLLM, "Qwen2MoeForCausalLM (renormalize=norm_topk_prob, sigmoid-gated shared expert)"),
        Runtime(LLAMA_CPP, "qwen2moe graph", (LLAMA_CPP_IGNORES_NORM_TOPK,)),
    ),
)
