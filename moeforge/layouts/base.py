"""What every output layout declares: tensor names, what inputs it can express, and its config keys."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from moeforge.families.base import describe_features
from moeforge.layouts import runtimes as rt


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The numbers a layout's config transform needs."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    renormalize: bool = True  # top-k router weights rescaled to sum to 1 (`norm_topk_prob`)


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
    notes: str = ""
    # config.json key of the top-k renormalisation switch; None: the layout always renormalises
    renormalize_key: Optional[str] = "norm_topk_prob"
    runtimes: Tuple[rt.Runtime, ...] = ()  # what each runtime makes of this layout (layouts/runtimes.py)

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

    def renormalize_refusal(self, renormalize: Optional[bool]) -> Optional[str]:
        """Why this layout cannot take the config's `renormalize:` value, or None."""
        if renormalize is False and self.renormalize_key is None:
            return f"{self.name} always renormalises the top-k router weights (its config has no switch)"
        return None

    def runtime_report(self, shape: MoEShape) -> List[rt.RuntimeStatus]:
        return rt.report(self.runtimes, shape)

    def runtime_warnings(self, shape: MoEShape) -> List[str]:
        return rt.warnings(self.runtimes, shape)

    def model_config(self, base_config: dict, shape: MoEShape, dtype: str) -> dict:
        """The output's config.json: the base's keys plus this layout's MoE keys, validated by transformers
        where the layout has a native class."""
        keys = {k: v for k, v in base_config.items() if k not in _NOT_CARRIED}
        keys.update(self.moe_config(shape))
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
