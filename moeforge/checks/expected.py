"""The tensors a checkpoint must hold, derived from its config.json.

The dense part (embeddings, attention, norms, lm_head) comes from transformers itself: the family's model is
instantiated on the meta device (no memory, no weights) and its state dict lists every name and shape. The
MoE part comes from the output layout's name templates, so adding a layout needs no change here.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple

from moeforge.families import FAMILIES
from moeforge.families.base import MLP_ROLES, Family
from moeforge.layouts import LAYOUTS, Layout
from moeforge.layouts.base import MoEShape, pack_shapes

log = logging.getLogger("moeforge")
Shapes = Dict[str, Tuple[int, ...]]
_IDENTITY_KEYS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version")


def dense_shapes(config: dict, model_type: str) -> Optional[Shapes]:
    """name -> shape for a dense `model_type` model with `config`; None when transformers cannot build it."""
    try:
        import torch
        import transformers

        keys = {k: v for k, v in config.items() if k not in _IDENTITY_KEYS}
        cfg = transformers.AutoConfig.for_model(model_type, **keys)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # an unusual config: the build's own shape checks still apply
        log.debug("cannot derive the expected tensors of a %s model: %s", model_type, e)
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # checkpoints of tied models may or may not store it
    return shapes


def moe_shape(layout: Layout, config: dict) -> MoEShape:
    """Invert the layout's config transform: which config key holds the expert count, top-k, sizes.

    The transform is probed with distinct numbers, so each layout states its keys once, in moe_config.
    """
    probe = MoEShape(1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081)
    key_of = {v: k for k, v in layout.moe_config(probe).items() if type(v) is int}
    values = {}
    for f in dataclasses.fields(MoEShape):
        if type(getattr(probe, f.name)) is not int:
            continue  # a switch, not a size
        key = key_of.get(getattr(probe, f.name))
        values[f.name] = int(config.get(key, 0) or 0) if key else 0
    if layout.renormalize_key is not None:
        values["renormalize"] = bool(config.get(layout.renormalize_key, True))
    return MoEShape(**values)


def moe_shapes(layout: Layout, config: dict) -> Shapes:
    """Routers and expert MLPs of `layout` for a model with `config`."""
    shape = moe_shape(layout, config)
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    out: Shapes = {}
    for layer in range(layers):
        out[layout.router_name(layer)] = (shape.num_experts, hidden)
        for expert in range(shape.num_experts):
            for role in MLP_ROLES:
                out[layout.expert_name(role, layer, expert)] = _mlp(role, shape.intermediate_size, hidden)
        if layout.shared_expert and (shape.num_shared_experts or shape.shared_intermediate_size):
            for role in MLP_ROLES:
                name = layout.shared_expert[role].format(layer=layer)
                out[name] = _mlp(role, shape.shared_intermediate_size, hidden)
    pack_shapes(layout, out, layers, shape.num_experts)
    return out


def _mlp(role: str, inter: int, hidden: int) -> Tuple[int, int]:
    return (hidden, inter) if role == "down" else (inter, hidden)


def layout_of(config: dict) -> Optional[Layout]:
    archs = config.get("architectures") or []
    for layout in LAYOUTS:
        if any(a in layout.architectures for a in archs) or layout.name == config.get("model_type"):
            return layout
    return None


def family_named(name: Optional[str], layout: Layout) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    return next(f for f in FAMILIES if f.name == layout.families[0])


def output_shapes(config: dict, layout: Layout, family: Family) -> Optional[Shapes]:
    """Every tensor a `layout` checkpoint built from `family` inputs holds; None if the dense part is unknown."""
    dense = dense_shapes(config, family.model_types[0])
    if dense is None:
        return None
    kept = {n: s for n, s in dense.items() if not family.is_mlp(n) and not family.is_skipped(n)}
    return {**kept, **moe_shapes(layout, config)}
