"""What every input family declares."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, FrozenSet, Optional, Tuple

MLP_ROLES = ("gate", "up", "down")
_LAYER = re.compile(r"\.layers\.(\d+)\.")

# Attention features a layout must be able to express, detected from tensor names of layer 0.
FEATURE_TENSORS: Dict[str, str] = {
    "qkv_bias": "model.layers.0.self_attn.q_proj.bias",
    "o_bias": "model.layers.0.self_attn.o_proj.bias",
    "qk_norm": "model.layers.0.self_attn.q_norm.weight",
    "mlp_bias": "model.layers.0.mlp.gate_proj.bias",
    "sandwich_norm": "model.layers.0.post_feedforward_layernorm.weight",
}

# What each feature means, for refusals.
FEATURE_DESCRIPTIONS: Dict[str, str] = {
    "qkv_bias": "q/k/v projection biases",
    "o_bias": "an o_proj bias",
    "qk_norm": "per-head q/k norms",
    "mlp_bias": "MLP biases",
    "custom_head_dim": "head_dim * heads != hidden_size",
    "sliding_window": "sliding-window attention",
    "partial_rotary": "rotary embeddings on part of each head (partial_rotary_factor < 1)",
    "rope_scaling": "scaled RoPE (rope_type other than default)",
    "gelu_mlp": "a GeGLU MLP; the MoE layouts are SwiGLU architectures",
    "non_silu_mlp": "an MLP activation other than SiLU; the MoE layouts are SwiGLU architectures",
    "offset_norm": "RMSNorm scaled by (1 + weight)",
    "embed_scale": "embeddings multiplied by sqrt(hidden_size)",
    "softcapping": "attention and final logit soft-capping",
    "sandwich_norm": "pre- and post-feed-forward norms",
    "query_pre_attn_scalar": "attention scaled by query_pre_attn_scalar instead of head_dim",
}


def describe_features(features) -> str:
    return ", ".join(f"{f} ({FEATURE_DESCRIPTIONS.get(f, f)})" for f in sorted(features))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    # role (gate/up/down) -> dense tensor name, with {layer}
    mlp: Dict[str, str]
    # tensors that are derived state, never weights (old checkpoints store them)
    skip_suffixes: Tuple[str, ...] = ("rotary_emb.inv_freq",)
    # features every checkpoint of the family has, whatever its config (Gemma's (1+w) norms, say)
    declared: FrozenSet[str] = frozenset()
    # a read transform that rewrites a checkpoint's tensor index into Llama names (fused tensors split)
    view: Optional[Callable] = None
    # config.json keys as other model classes read them (legacy spellings normalised)
    config_fixup: Optional[Callable[[dict], dict]] = None

    def output_config(self, config: dict) -> dict:
        return self.config_fixup(dict(config)) if self.config_fixup is not None else config

    def mlp_name(self, role: str, layer: int) -> str:
        return self.mlp[role].format(layer=layer)

    def is_mlp(self, name: str) -> bool:
        m = _LAYER.search(name)
        return bool(m) and name in {self.mlp_name(r, int(m.group(1))) for r in MLP_ROLES}

    def is_skipped(self, name: str) -> bool:
        return name.endswith(self.skip_suffixes)

    def prepare(self, checkpoint) -> None:
        """Apply the family's read transform, if any, so the checkpoint shows Llama tensor names."""
        if self.view is not None:
            checkpoint.add_view(self.view)

    def features(self, checkpoint) -> FrozenSet[str]:
        found = {f for f, t in FEATURE_TENSORS.items() if t in checkpoint.tensors} | set(self.declared)
        get = checkpoint.config_value
        head_dim, hidden, heads = (get(k) for k in ("head_dim", "hidden_size", "num_attention_heads"))
        if head_dim and heads and head_dim * heads != hidden:
            found.add("custom_head_dim")  # head_dim * heads != hidden_size: layouts without head_dim can't hold it
        window, max_pos = get("sliding_window"), get("max_position_embeddings")
        if window and get("use_sliding_window", True) is not False and not (max_pos and window >= max_pos):
            found.add("sliding_window")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if isinstance(rope, dict):
            if (rope.get("rope_type") or rope.get("type") or "default") != "default":
                found.add("rope_scaling")
            if float(rope.get("partial_rotary_factor", 1.0) or 1.0) < 1.0:
                found.add("partial_rotary")
        if float(get("partial_rotary_factor", 1.0) or 1.0) < 1.0:
            found.add("partial_rotary")
        act = get("hidden_activation") or get("hidden_act") or "silu"
        if act not in ("silu", "swish"):
            found.add("gelu_mlp" if "gelu" in str(act) else "non_silu_mlp")
        if get("attn_logit_softcapping") or get("final_logit_softcapping"):
            found.add("softcapping")
        scalar = get("query_pre_attn_scalar")
        if scalar and scalar != (head_dim or (hidden // heads if hidden and heads else None)):
            found.add("query_pre_attn_scalar")
        return frozenset(found)


def layer_of(name: str):
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
