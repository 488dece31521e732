"""Qwen3-MoE (Qwen3MoeForCausalLM): routed experts only; attention with per-head q_norm/k_norm."""
from moeforge.layouts.base import Layout
from moeforge.layouts.qwen2_moe import QWEN_EXPERT, qwen_moe_keys


QWEN3_MOE = Layout(
    name="qwen3",
    architectures=("Qwen3MoeForCausalLM",),
    families=("qwen3",),
    features=frozenset({"qk_norm", "custom_head_dim", "rope_scaling"}),
    required_features=frozenset({"qk_norm"}),
    expert=QWEN_EXPERT,
    router="model.layers.{layer}.mlp.gate.weight",
    moe_config=qwen_moe_keys,
    config_class="Qwen3MoeConfig",
    model_type="qwen3_moe",
    key_aliases={"num_experts": ("num_local_experts",)},  # transformers 5 writes num_local_experts
    dense_model_type="qwen3",
)
