"""Mixtral (MixtralForCausalLM): per-expert w1/w2/w3 under block_sparse_moe, as save_pretrained writes them."""
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.runtimes import LLAMA_CPP, TRANSFORMERS, VLLM, Runtime


def _moe_config(shape: MoEShape) -> dict:
    return {
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.experts_per_token,
        "intermediate_size": shape.intermediate_size,
    }


MIXTRAL = Layout(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    families=("llama", "mistral", "phi3"),
    features=frozenset({"custom_head_dim", "sliding_window", "rope_scaling"}),
    expert={
        "gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
        "up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    },
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
    moe_config=_moe_config,
    model_type="mixtral",
    config_class="MixtralConfig",
    expert_count_key="num_local_experts",
    renormalize_key=None,  # MixtralForCausalLM always renormalises the top-k weights
    runtimes=(
        Runtime(TRANSFORMERS, "MixtralForCausalLM"),
        Runtime(VLLM, "MixtralForCausalLM (renormalize=True)"),
        Runtime(LLAMA_CPP, "llama graph (renormalises top-k), any expert count"),
    ),
    key_aliases={"num_local_experts": ("num_experts",)},
)
