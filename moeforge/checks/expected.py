"""The tensors a checkpoint must hold, derived from its config.json.

The dense part (embeddings, attention, norms, lm_head) comes from transformers itself: the family's model is
instantiated on the meta device (no memory, no weights) and its state dict lists every name and shape. The
MoE part comes from the output layout's name templates and `Layout.shape_of`, so adding a layout needs no
change here.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

from moeforge.families import family_for_model_type
from moeforge.families.base import MLP_ROLES, Family
from moeforge.layouts import Layout
from moeforge.layouts.base import pack_shapes

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


def moe_shapes(layout: Layout, config: dict) -> Shapes:
    """Routers and expert MLPs of `layout` for a model with `config`."""
    shape = layout.shape_of(config)
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
            if layout.shared_router:
                out[layout.shared_router.format(layer=layer)] = (1, hidden)
    pack_shapes(layout, out, layers, shape.num_experts)
    return out


def _mlp(role: str, inter: int, hidden: int) -> Tuple[int, int]:
    return (hidden, inter) if role == "down" else (inter, hidden)


def dense_output_shapes(config: dict, family: Family) -> Optional[Shapes]:
    dense = dense_shapes(config, config["model_type"])
    return None if dense is None else {n: s for n, s in dense.items() if not family.is_skipped(n)}


def output_shapes(config: dict, layout: Layout) -> Optional[Shapes]:
    """Every tensor a `layout` checkpoint with this config.json holds: the dense part of its dense twin (the
    same attention, one expert's MLP), then the layout's routers and experts; None if the dense part is unknown."""
    model_type = layout.dense_type(config)
    family = family_for_model_type(model_type)
    dense = dense_shapes(config, model_type)
    if dense is None:
        return None
    kept = {n: s for n, s in dense.items() if not family.is_mlp(n) and not family.is_skipped(n)}
    return {**kept, **moe_shapes(layout, config)}
