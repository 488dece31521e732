"""DeepSeek-MoE v1 (DeepseekForCausalLM, model_type deepseek), as deepseek-moe-16b names it.

transformers has no native class: it loads with trust_remote_code through `auto_map` (the 16b repo's code);
vLLM and llama.cpp read the layout natively. Shared experts are ungated and stored as one MLP of
n_shared_experts * moe_intermediate_size (their MLPs concatenated: the sum of their outputs). The remote
code knows only linear/dynamic RoPE scaling and no sliding window, so inputs with either are refused.
"""
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.qwen2_moe import QWEN_EXPERT

_REMOTE = "deepseek-ai/deepseek-moe-16b-base--"


def _moe_config(shape: MoEShape) -> dict:
    return {
        "n_routed_experts": shape.num_experts,
        "n_shared_experts": shape.num_shared_experts or None,
        "num_experts_per_tok": shape.experts_per_token,
        "moe_intermediate_size": shape.intermediate_size,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": True,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "auto_map": {
            "AutoConfig": _REMOTE + "configuration_deepseek.DeepseekConfig",
            "AutoModel": _REMOTE + "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": _REMOTE + "modeling_deepseek.DeepseekForCausalLM",
        },
    }


DEEPSEEK_MOE = Layout(
    name="deepseek",
    architectures=("DeepseekForCausalLM",),
    families=("llama", "mistral", "phi3"),
    features=frozenset(),
    expert=QWEN_EXPERT,
    router="model.layers.{layer}.mlp.gate.weight",
    moe_config=_moe_config,
    model_type="deepseek",
    max_shared_experts=None,
    expert_count_key="n_routed_experts",
    shared_width_is_routed=True,
    shared_expert={
        "gate": "model.layers.{layer}.mlp.shared_experts.gate_proj.weight",
        "up": "model.layers.{layer}.mlp.shared_experts.up_proj.weight",
        "down": "model.layers.{layer}.mlp.shared_experts.down_proj.weight",
    },
)
