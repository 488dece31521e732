"""Qwen3-MoE (Qwen3MoeForCausalLM): routed experts only; attention with per-head q_norm/k_norm."""
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.qwen2_moe import QWEN_EXPERT


def _moe_config(shape: MoEShape) -> dict:
    return {
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.experts_per_token,
        "moe_intermediate_size": shape.intermediate_size,
        "intermediate_size": shape.intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


QWEN3_MOE = Layout(
    name="qwen3",
    architectures=("Qwen3MoeForCausalLM",),
    families=("qwen3",),
    features=frozenset({"qk_norm", "custom_head_dim", "rope_scaling"}),
    required_features=frozenset({"qk_norm"}),
    expert=QWEN_EXPERT,
    router="model.layers.{layer}.mlp.gate.weight",
    moe_config=_moe_config,
    config_class="Qwen3MoeConfig",
    dense_model_type="qwen3",
)
