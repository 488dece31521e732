"""Granite-MoE with shared experts (GraniteMoeSharedForCausalLM): native in transformers, llama.cpp and vLLM.

With its embedding, residual and logit multipliers at 1 and its attention scale at 1/sqrt(head_dim), its
attention, norms, RoPE (every rope_type transformers knows) and embeddings compute what Llama's do. Its router
softmaxes over the top-k logits (renormalised top-k), so identical experts reproduce the dense MLP. There is
no head_dim key (transformers 4.x, llama.cpp and vLLM take hidden_size / heads) and no sliding window.

Experts are stored fused: `input_linear` (experts, 2 * I, hidden) holds each expert's gate rows then its up
rows, `output_linear` (experts, hidden, I) its down. The shared MLP is ungated: `shared_mlp.input_linear`
(2 * S, hidden) is gate then up, `shared_mlp.output_linear` (hidden, S); several shared experts are
concatenated into it (the sum of their outputs), and without any, S = 0 and the layer has no shared MLP.

llama.cpp's converter takes default, linear and YaRN RoPE but stops at rope_type llama3 (its GRANITE_MOE
architecture has no rope_freqs tensor); docs/adding-a-layout.md lists what each runtime reads.
"""
from moeforge.layouts.base import Layout, MoEShape, Packed
from moeforge.layouts.runtimes import LLAMA_CPP, TRANSFORMERS, VLLM, Runtime

_MOE = "model.layers.{layer}.block_sparse_moe"
_SHARED = "model.layers.{layer}.shared_mlp"


def _moe_config(shape: MoEShape) -> dict:
    return {
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.experts_per_token,
        "intermediate_size": shape.intermediate_size,
        "shared_intermediate_size": shape.shared_intermediate_size,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
    }


def _attention_scale(keys: dict) -> dict:
    """Llama's softmax scale, written out: Granite's attention_multiplier replaces it."""
    head_dim = keys.get("head_dim") or keys["hidden_size"] // keys["num_attention_heads"]
    return {"attention_multiplier": head_dim ** -0.5}


GRANITE_MOE_SHARED = Layout(
    name="granite",
    architectures=("GraniteMoeSharedForCausalLM",),
    families=("llama", "mistral"),
    features=frozenset({"rope_scaling"}),
    # member names of the fused tensors below; only the shared down projection is stored under its own name
    expert={
        "gate": _MOE + ".experts.{expert}.gate_proj",
        "up": _MOE + ".experts.{expert}.up_proj",
        "down": _MOE + ".experts.{expert}.down_proj",
    },
    router=_MOE + ".router.layer.weight",
    moe_config=_moe_config,
    derived_config=_attention_scale,
    config_class="GraniteMoeSharedConfig",
    model_type="granitemoeshared",
    expert_count_key="num_local_experts",
    renormalize_key=None,  # its router softmaxes over the top-k logits: always renormalised
    runtimes=(
        Runtime(TRANSFORMERS, "GraniteMoeSharedForCausalLM"),
        Runtime(VLLM, "GraniteMoeSharedForCausalLM (renormalize=True)"),
        Runtime(LLAMA_CPP, "granitemoe graph (renormalises top-k); rope_type llama3 inputs do not convert"),
    ),
    max_shared_experts=None,
    shared_expert={
        "gate": _SHARED + ".gate_proj",
        "up": _SHARED + ".up_proj",
        "down": _SHARED + ".output_linear.weight",
    },
    packed=(
        Packed(_MOE + ".input_linear.weight", ("gate", "up")),
        Packed(_MOE + ".output_linear.weight", ("down",)),
        Packed(_SHARED + ".input_linear.weight", ("gate", "up"), per_expert=False),
    ),
)
