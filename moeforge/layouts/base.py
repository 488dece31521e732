"""What every output layout declares: tensor names, what inputs it can express, and its config keys."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from moeforge.families.base import describe_features


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The numbers a layout's config transform needs."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0


@dataclasses.dataclass(frozen=True)
class Packed:
    """One stored tensor that holds several of the layout's MLP tensors (fused experts).

    The members are the layout's `expert` (or `shared_expert`) names for `roles`, joined along rows in that
    order; with `per_expert`, each routed expert's join is one slice of a new first dimension, so the stored
    shape is (experts, rows, cols), else (rows, cols). Either way the stored bytes are the members' bytes one
    after another, so a member is a row range of the stored tensor seen as 2-D; members have equal rows (one
    MLP's gate and up), which is how a stored tensor is split when read back.
    """

    name: str  # with {layer}
    roles: Tuple[str, ...]
    per_expert: bool = True

    def stored_name(self, layer: int) -> str:
        return self.name.format(layer=layer)

    def members(self, layout: "Layout", layer: int, num_experts: int) -> List[str]:
        """The member names in storage order."""
        if not self.per_expert:
            return [layout.shared_expert[role].format(layer=layer) for role in self.roles]
        return [layout.expert_name(role, layer, e) for e in range(num_experts) for role in self.roles]

    def stored_shape(self, member_shapes: List[Tuple[int, ...]], num_experts: int) -> Tuple[int, ...]:
        rows = sum(s[0] for s in member_shapes)
        if not self.per_expert:
            return (rows, *member_shapes[0][1:])
        return (num_experts, rows // max(num_experts, 1), *member_shapes[0][1:])


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # the `architecture:` value
    architectures: Tuple[str, ...]
    families: Tuple[str, ...]  # input families whose attention it expresses exactly
    features: FrozenSet[str]  # attention features (families.base.FEATURE_TENSORS) it can hold
    # role (gate/up/down) -> output name with {layer} and {expert}
    expert: Dict[str, str]
    router: str  # with {layer}
    moe_config: Callable[[MoEShape], dict]
    config_class: Optional[str] = None  # transformers class that validates and fills the config, if native
    model_type: Optional[str] = None  # for layouts without a transformers class
    max_shared_experts: Optional[int] = 0  # None: any number (concatenated into one MLP)
    min_shared_experts: int = 0
    shared_expert: Optional[Dict[str, str]] = None  # role -> name with {layer}
    shared_router: Optional[str] = None  # a gated shared expert's router row, with {layer}
    required_features: FrozenSet[str] = frozenset()  # filled with zeros when the input lacks them
    expert_count_key: str = "num_experts"  # config.json key holding the number of routed experts
    dense_model_type: str = "llama"  # the dense family one expert plus the attention is (moeforge extract)
    packed: Tuple[Packed, ...] = ()  # stored tensors that hold several expert tensors (fused-expert layouts)
    # config keys that depend on the base's (Granite's attention scale), given the merged keys
    derived_config: Optional[Callable[[dict], dict]] = None
    notes: str = ""

    def expert_name(self, role: str, layer: int, expert: int) -> str:
        return self.expert[role].format(layer=layer, expert=expert)

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def refusal(self, family_name: str, features: FrozenSet[str]) -> Optional[str]:
        """Why this layout cannot express an input's attention, or None."""
        if family_name not in self.families:
            return f"{self.name} takes {'/'.join(self.families)} inputs, not {family_name}"
        missing = features - self.features
        if missing:
            return f"{self.name} cannot express {describe_features(missing)}"
        return None

    def shared_refusal(self, shared, gate_mode: str) -> Optional[str]:
        """Why this layout cannot take these shared experts, or None."""
        if self.max_shared_experts is not None and len(shared) > self.max_shared_experts:
            if self.max_shared_experts == 0:
                return f"{self.name} has no shared experts (remove shared_experts)"
            return f"{self.name} takes at most {self.max_shared_experts} shared expert(s)"
        if len(shared) < self.min_shared_experts:
            return f"{self.name} needs {self.min_shared_experts} shared expert(s) in shared_experts"
        prompted = [bool(e.positive_prompts) for e in shared]
        if self.shared_router is None and any(prompted):
            return f"{self.name} shared experts are ungated: remove their prompts"
        if self.shared_router is not None and gate_mode not in ("random", "uniform_random") and not all(prompted):
            return f"{self.name} gates its shared expert: give it positive_prompts (or use a random gate_mode)"
        return None

    def model_config(self, base_config: dict, shape: MoEShape, dtype: str) -> dict:
        """The output's config.json: the base's keys plus this layout's MoE keys, validated by transformers
        where the layout has a native class."""
        keys = {k: v for k, v in base_config.items() if k not in _NOT_CARRIED}
        keys.update(self.moe_config(shape))
        if self.derived_config is not None:
            keys.update(self.derived_config(keys))
        if self.config_class is None:
            return {"architectures": list(self.architectures), "model_type": self.model_type,
                    **legacy_rope_keys(keys), "torch_dtype": dtype}
        import transformers

        hidden, heads = keys.get("hidden_size"), keys.get("num_attention_heads")
        if keys.get("head_dim") is None and hidden and heads:
            keys["head_dim"] = hidden // heads  # what it is anyway; scaled-RoPE validation reads it
        config = getattr(transformers, self.config_class)(**keys)
        config.architectures = list(self.architectures)
        config.dtype = dtype
        return config.to_dict()


def pack_shapes(layout: Layout, shapes: Dict[str, Tuple[int, ...]], num_layers: int, num_experts: int) -> None:
    """Replace the members of `layout`'s packed tensors in `shapes` (name -> shape) by the stored tensors."""
    for layer in range(num_layers):
        for packed in layout.packed:
            members = packed.members(layout, layer, num_experts)
            if not all(m in shapes for m in members):
                continue  # no shared expert
            member_shapes = [shapes.pop(m) for m in members]
            shapes[packed.stored_name(layer)] = packed.stored_shape(member_shapes, num_experts)


def legacy_rope_keys(keys: dict) -> dict:
    """Remote-code models (DeepSeek v1) read `rope_theta`/`rope_scaling`, not transformers 5's `rope_parameters`."""
    params = keys.pop("rope_parameters", None)
    if isinstance(params, dict):
        keys.setdefault("rope_theta", params.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            keys.setdefault("rope_scaling", {"type": scaling["rope_type"], **scaling})
        else:
            keys.setdefault("rope_scaling", None)
    return keys


# Identity and bookkeeping keys of the base, never carried into the MoE's config.
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
