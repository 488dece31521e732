"""What every input family declares."""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, FrozenSet, Tuple

MLP_ROLES = ("gate", "up", "down")
_LAYER = re.compile(r"\.layers\.(\d+)\.")

# Attention features a layout must be able to express, detected from tensor names of layer 0.
FEATURE_TENSORS: Dict[str, str] = {
    "qkv_bias": "model.layers.0.self_attn.q_proj.bias",
    "o_bias": "model.layers.0.self_attn.o_proj.bias",
    "qk_norm": "model.layers.0.self_attn.q_norm.weight",
    "mlp_bias": "model.layers.0.mlp.gate_proj.bias",
}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    # role (gate/up/down) -> dense tensor name, with {layer}
    mlp: Dict[str, str]
    # tensors that are derived state, never weights (old checkpoints store them)
    skip_suffixes: Tuple[str, ...] = ("rotary_emb.inv_freq",)

    def mlp_name(self, role: str, layer: int) -> str:
        return self.mlp[role].format(layer=layer)

    def is_mlp(self, name: str) -> bool:
        m = _LAYER.search(name)
        return bool(m) and name in {self.mlp_name(r, int(m.group(1))) for r in MLP_ROLES}

    def is_skipped(self, name: str) -> bool:
        return name.endswith(self.skip_suffixes)

    def features(self, checkpoint) -> FrozenSet[str]:
        found = {f for f, t in FEATURE_TENSORS.items() if t in checkpoint.tensors}
        head_dim, hidden, heads = (checkpoint.config_value(k) for k in ("head_dim", "hidden_size", "num_attention_heads"))
        if head_dim and heads and head_dim * heads != hidden:
            found.add("custom_head_dim")  # head_dim * heads != hidden_size: layouts without head_dim can't hold it
        return frozenset(found)


def layer_of(name: str):
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
