"""DeepSeek-MoE v1 (DeepseekForCausalLM, model_type deepseek), as deepseek-moe-16b names it.

transformers has no native class: every output carries configuration_deepseek.py and modeling_deepseek.py
(deepseek_code/: deepseek-moe-16b's math), which `auto_map` names, so trust_remote_code loads it with no Hub
access; vLLM and llama.cpp read the layout natively. Shared experts are ungated and stored as one MLP of
n_shared_experts * moe_intermediate_size (their MLPs concatenated: the sum of their outputs). DeepSeek's code
knows only linear/dynamic RoPE scaling and no sliding window, so inputs with either are refused.
"""
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.qwen2_moe import QWEN_EXPERT
from moeforge.layouts.runtimes import (FAILS, LLAMA_CPP, LLAMA_CPP_IGNORES_NORM_TOPK, TRANSFORMERS, VLLM, Caveat,
                                       Runtime)

_CODE = ("deepseek_code/configuration_deepseek.py", "deepseek_code/modeling_deepseek.py")


def _moe_config(shape: MoEShape) -> dict:
    return {
        "n_routed_experts": shape.num_experts,
        "n_shared_experts": shape.num_shared_experts or None,
        "num_experts_per_tok": shape.experts_per_token,
        "moe_intermediate_size": shape.intermediate_size,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": shape.renormalize,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
    }


# n_shared_experts: null is what DeepSeek's code, transformers and vLLM read as "none".
_LLAMA_CPP_NEEDS_SHARED = Caveat(
    when=lambda s: s.num_shared_experts == 0,
    effect=FAILS,
    reason="the graph requires shared-expert tensors (convert_hf_to_gguf.py stops at "
           "n_shared_experts: null; with 0 it converts and llama.cpp stops at the missing blk.0.ffn_gate_shexp)",
    remedy="add a silent shared expert, `shared_experts: [{source_model: <base>, residual_scale: 0}]`, which "
           "adds nothing in any runtime",
)


DEEPSEEK_MOE = Layout(
    name="deepseek",
    architectures=("DeepseekForCausalLM",),
    families=("llama", "mistral", "phi3"),
    features=frozenset(),
    expert=QWEN_EXPERT,
    router="model.layers.{layer}.mlp.gate.weight",
    moe_config=_moe_config,
    model_type="deepseek",
    code_files=_CODE,
    rope_parameters=False,  # its remote code reads rope_theta and rope_scaling
    max_shared_experts=None,
    expert_count_key="n_routed_experts",
    shared_width_is_routed=True,
    shared_expert={
        "gate": "model.layers.{layer}.mlp.shared_experts.gate_proj.weight",
        "up": "model.layers.{layer}.mlp.shared_experts.up_proj.weight",
        "down": "model.layers.{layer}.mlp.shared_experts.down_proj.weight",
    },
    runtimes=(
        Runtime(TRANSFORMERS, "DeepseekForCausalLM (remote code, trust_remote_code=True)"),
        Runtime(VLLM, "DeepseekForCausalLM (deepseek_v2.py: renormalize=norm_topk_prob, no shared MLP when "
                      "n_shared_experts is null)"),
        Runtime(LLAMA_CPP, "deepseek graph", (_LLAMA_CPP_NEEDS_SHARED, LLAMA_CPP_IGNORES_NORM_TOPK)),
    ),
)
