"""What every output layout declares: tensor names, what inputs it can express, and its config keys."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from moeforge.families.base import describe_features
from moeforge.gate_modes import GATE_MODES


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
    architectures: Tuple[str, ...]
    families: Tuple[str, ...]  # input families whose attention it expresses exactly
    features: FrozenSet[str]  # attention features (families.base.FEATURE_TENSORS) it can hold
    # role (gate/up/down) -> output name with {layer} and {expert}
    expert: Dict[str, str]
    router: str  # with {layer}
    moe_config: Callable[[MoEShape], dict]
    config_class: Optional[str] = None  # transformers class that validates and fills the config, if native
    model_type: Optional[str] = None  # config.json's model_type
    max_shared_experts: Optional[int] = 0  # None: any number (concatenated into one MLP)
    min_shared_experts: int = 0
    shared_expert: Optional[Dict[str, str]] = None  # role -> name with {layer}
    shared_router: Optional[str] = None  # a gated shared expert's router row, with {layer}
    required_features: FrozenSet[str] = frozenset()  # filled with zeros when the input lacks them
    expert_count_key: str = "num_experts"  # config.json key holding the number of routed experts
    # config key -> other spellings of it that readers accept (transformers 5 renamed some keys)
    key_aliases: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # True: each shared expert has the routed experts' width and the config counts them (DeepSeek);
    # False: shared experts of any width are concatenated and the config holds the total width (Qwen2-MoE)
    shared_width_is_routed: bool = False
    dense_model_type: str = "llama"  # the dense family one expert plus the attention is (moeforge extract)
    # llama.cpp runs this layout only with a power-of-two number of experts
    power_of_two_experts: bool = False
    # files written beside the weights, name -> text (e.g. remote code the layout's readers need)
    extra_files: Callable[[], Dict[str, str]] = dict
    notes: str = ""

    def warnings(self, shape: MoEShape) -> List[str]:
        """What a build of this shape should be told about where it will run."""
        n = shape.num_experts
        if self.power_of_two_experts and n & (n - 1):
            return [f"{n} experts is not a power of two: llama.cpp cannot run this model"]
        return []

    def recognises(self, config: dict) -> bool:
        """Whether a checkpoint's config.json is one of this layout's (by class name, else model_type)."""
        archs = config.get("architectures") or []
        if archs:
            return any(a in self.architectures for a in archs)
        return config.get("model_type") == self.model_type

    def dense_type(self, config: dict) -> str:
        """model_type of the dense model with this MoE's attention and one expert's MLP (`moeforge extract`,
        and the dense part `verify` expects); a sliding window makes a Llama twin a Mistral."""
        if self.dense_model_type == "llama" and config.get("sliding_window") is not None:
            return "mistral"
        return self.dense_model_type

    def expert_count_keys(self) -> Tuple[str, ...]:
        """Every spelling of the routed-expert count key that readers accept, the written one first."""
        return (self.expert_count_key,) + self.key_aliases.get(self.expert_count_key, ())

    def config_value(self, config: dict, key: str):
        """`key` from a config.json, under any spelling this layout's readers accept."""
        for k in (key,) + self.key_aliases.get(key, ()):
            if config.get(k) is not None:
                return config[k]
        return None

    def shape_of(self, config: dict) -> MoEShape:
        """The numbers `moe_config` wrote into a config.json, read back (missing keys read as 0).

        `moe_config` is probed with distinct numbers, so each layout states its keys once."""
        probe = MoEShape(1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081)
        key_of = {v: k for k, v in self.moe_config(probe).items() if isinstance(v, int) and not isinstance(v, bool)}
        values = {}
        for f in dataclasses.fields(MoEShape):
            key = key_of.get(getattr(probe, f.name))
            value = self.config_value(config, key) if key else None
            values[f.name] = value if isinstance(value, int) and not isinstance(value, bool) else 0
        if self.shared_width_is_routed:
            values["shared_intermediate_size"] = values["num_shared_experts"] * values["intermediate_size"]
        elif values["shared_intermediate_size"]:
            values["num_shared_experts"] = values["num_shared_experts"] or 1  # one MLP, however many went in
        return MoEShape(**values)

    def moe_keys(self) -> FrozenSet[str]:
        """Every config key this layout's MoE part writes or reads (for rewriting a config with a new shape)."""
        keys = set(self.moe_config(MoEShape(1, 1, 1)))
        return frozenset(keys.union(*self.key_aliases.values()) if self.key_aliases else keys)

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
        if self.shared_router is not None and GATE_MODES[gate_mode].needs_prompts and not all(prompted):
            return f"{self.name} gates its shared expert: give it positive_prompts (or use a random gate_mode)"
        return None

    def model_config(self, base_config: dict, shape: MoEShape, dtype: str) -> dict:
        """The output's config.json: the base's keys plus this layout's MoE keys, validated by transformers
        where the layout has a native class."""
        keys = {k: v for k, v in base_config.items() if k not in _NOT_CARRIED and k not in self.moe_keys()}
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
