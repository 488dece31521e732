"""What every output layout declares: tensor names, what inputs it can express, and its config keys."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The numbers a layout's config transform needs."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # the `architecture:` value
    config_class: str  # transformers config class that validates and fills the config
    architectures: Tuple[str, ...]
    families: Tuple[str, ...]  # input families whose attention it expresses exactly
    features: FrozenSet[str]  # attention features (families.base.FEATURE_TENSORS) it can hold
    # role (gate/up/down) -> output name with {layer} and {expert}
    expert: Dict[str, str]
    router: str  # with {layer}
    moe_config: Callable[[MoEShape], dict]
    max_shared_experts: int = 0
    min_shared_experts: int = 0
    shared_expert: Optional[Dict[str, str]] = None  # role -> name with {layer}
    shared_router: Optional[str] = None
    required_features: FrozenSet[str] = frozenset()  # filled with zeros when the input lacks them
    drop_config_keys: Tuple[str, ...] = ()

    def expert_name(self, role: str, layer: int, expert: int) -> str:
        return self.expert[role].format(layer=layer, expert=expert)

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def refusal(self, family_name: str, features: FrozenSet[str]) -> Optional[str]:
        """Why this layout cannot express an input, or None."""
        if family_name not in self.families:
            return f"{self.name} takes {'/'.join(self.families)} inputs, not {family_name}"
        missing = sorted(features - self.features)
        if missing:
            return f"{self.name} cannot express {', '.join(missing)}"
        return None

    def model_config(self, base_config: dict, shape: MoEShape, dtype: str):
        """The output's transformers config: the base's keys, this layout's MoE keys, validated by its class."""
        import transformers

        keys = {k: v for k, v in base_config.items() if k not in _NOT_CARRIED}
        keys.update(self.moe_config(shape))
        config = getattr(transformers, self.config_class)(**keys)
        config.architectures = list(self.architectures)
        config.dtype = dtype
        return config


# Identity and bookkeeping keys of the base, never carried into the MoE's config.
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
