"""Phi-3: Llama's attention and SwiGLU MLP, stored fused (qkv_proj, gate_up_proj); split on read into views."""
from __future__ import annotations

import dataclasses

from moeforge.errors import SourceError
from moeforge.families.base import Family
from moeforge.families.llama import LLAMA_MLP

_FUSED = {
    ".self_attn.qkv_proj.weight": ("q_proj", "k_proj", "v_proj"),
    ".mlp.gate_up_proj.weight": ("gate_proj", "up_proj"),
}


def _row_splits(checkpoint, suffix: str, rows: int):
    if suffix.endswith("gate_up_proj.weight"):
        if rows % 2:
            raise SourceError(f"{checkpoint.label}: gate_up_proj has an odd number of rows ({rows})")
        return [rows // 2, rows // 2]
    get = checkpoint.config_value
    heads = get("num_attention_heads")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    if sum(sizes) != rows:
        raise SourceError(f"{checkpoint.label}: qkv_proj has {rows} rows, but its config implies {sizes} (q, k, v)")
    return sizes


def split_fused(checkpoint) -> None:
    """qkv_proj -> q/k/v_proj and gate_up_proj -> gate/up_proj, as row views of the fused tensors (and LoRA
    deltas of the fused modules, split the same way)."""
    tensors = {}
    for name, ref in checkpoint.tensors.items():
        suffix = next((s for s in _FUSED if name.endswith(s)), None)
        if suffix is None:
            tensors[name] = ref
            continue
        prefix = name[: -len(suffix)] + suffix.rsplit(".", 2)[0]  # model.layers.N.self_attn / .mlp
        first = 0
        delta = checkpoint.delta_for(name)
        for part, rows in zip(_FUSED[suffix], _row_splits(checkpoint, suffix, ref.shape[0])):
            tensors[f"{prefix}.{part}.weight"] = ref.rows(first, rows)
            if delta is not None:
                checkpoint.adapter.deltas[f"{prefix}.{part}.weight"] = dataclasses.replace(delta, rows=(first, first + rows))
            first += rows
    checkpoint.tensors = tensors


def _legacy_rope(config: dict) -> dict:
    """Phi-3's old rope_scaling types `su` and `yarn` are LongRoPE (Phi3Config maps them; other classes don't)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if isinstance(rope, dict) and (rope.get("type") or rope.get("rope_type")) in ("su", "yarn"):
            rope = {k: v for k, v in rope.items() if k != "type"}
            config[key] = {**rope, "rope_type": "longrope"}
    return config


PHI3 = Family(name="phi3", model_types=("phi3",), mlp=LLAMA_MLP, view=split_fused, config_fixup=_legacy_rope)
