"""What every output layout declares: tensor names, what inputs it can express, and its config keys."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from moeforge.families.base import describe_features
from moeforge.gate_modes import GATE_MODES
from moeforge.layouts.runtimes import Runtime, RuntimeStatus
from moeforge.layouts.runtimes import report as runtimes_report, warnings as runtimes_warnings


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
    model_type: str  # config.json's model_type
    config_class: Optional[str] = None  # transformers class that validates the config, if native
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
    # config key -> the name another transformers version reads it under; both are written
    aliases: Dict[str, str] = dataclasses.field(default_factory=dict)
    rope_parameters: bool = True  # write transformers 5's `rope_parameters` beside the legacy RoPE keys
    packed: Tuple[Packed, ...] = ()  # stored tensors that hold several expert tensors (fused-expert layouts)
    # config keys that depend on the base's (Granite's attention scale), given the merged keys
    derived_config: Optional[Callable[[dict], dict]] = None
    notes: str = ""
    # modeling code shipped beside the weights (config.json's auto_map names it): paths under moeforge/layouts/
    code_files: Tuple[str, ...] = ()
    # config.json key of the top-k renormalisation switch; None: the layout always renormalises
    renormalize_key: Optional[str] = "norm_topk_prob"
    runtimes: Tuple[Runtime, ...] = ()  # what each runtime makes of this layout (layouts/runtimes.py)

    def warnings(self, shape: MoEShape) -> List[str]:
        """One line per runtime that will not compute what transformers computes for a build of this shape."""
        return runtimes_warnings(self.runtimes, shape)

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
        return (self.expert_count_key,) + self.spellings(self.expert_count_key)

    def spellings(self, key: str) -> Tuple[str, ...]:
        """Other names of a config key: the one written beside it (`aliases`), then those only read."""
        written = (self.aliases[key],) if key in self.aliases else ()
        return written + tuple(k for k in self.key_aliases.get(key, ()) if k not in written)

    def config_value(self, config: dict, key: str):
        """`key` from a config.json, under any spelling this layout's readers accept."""
        for k in (key,) + self.spellings(key):
            if config.get(k) is not None:
                return config[k]
        return None

    def shape_of(self, config: dict) -> MoEShape:
        """The numbers `moe_config` wrote into a config.json, read back (missing keys read as 0).

        `moe_config` is probed with distinct numbers, so each layout states its keys once."""
        probe = MoEShape(1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081)
        key_of = {v: k for k, v in self.moe_config(probe).items() if type(v) is int}
        values = {}
        for f in dataclasses.fields(MoEShape):
            if type(getattr(probe, f.name)) is not int:
                continue  # a switch, not a size
            key = key_of.get(getattr(probe, f.name))
            value = self.config_value(config, key) if key else None
            values[f.name] = value if isinstance(value, int) and not isinstance(value, bool) else 0
        if self.shared_width_is_routed:
            values["shared_intermediate_size"] = values["num_shared_experts"] * values["intermediate_size"]
        elif values["shared_intermediate_size"]:
            values["num_shared_experts"] = values["num_shared_experts"] or 1  # one MLP, however many went in
        if self.renormalize_key is not None:
            values["renormalize"] = bool(self.config_value(config, self.renormalize_key) in (None, True))
        return MoEShape(**values)

    def moe_keys(self) -> FrozenSet[str]:
        """Every config key this layout's MoE part writes or reads (for rewriting a config with a new shape)."""
        keys = set(self.moe_config(MoEShape(1, 1, 1)))
        return frozenset(keys.union(*(self.spellings(k) for k in keys)))

    def expert_name(self, role: str, layer: int, expert: int) -> str:
        return self.expert[role].format(layer=layer, expert=expert)

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def extra_files(self) -> Dict[str, str]:
        """Files written beside the weights, name -> text: the layout's own modeling code, so that
        `trust_remote_code` loads the output with no Hub access."""
        here = Path(__file__).parent
        return {Path(name).name: (here / name).read_text(encoding="utf-8") for name in self.code_files}

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

    def renormalize_refusal(self, renormalize: Optional[bool]) -> Optional[str]:
        """Why this layout cannot take the config's `renormalize:` value, or None."""
        if renormalize is False and self.renormalize_key is None:
            return f"{self.name} always renormalises the top-k router weights (its config has no switch)"
        return None

    def runtime_report(self, shape: MoEShape) -> List[RuntimeStatus]:
        return runtimes_report(self.runtimes, shape)

    def model_config(self, base_config: dict, shape: MoEShape, dtype: str) -> dict:
        """The output's config.json: the base's keys plus this layout's MoE keys, written so that transformers
        4.46-4.57 and 5.x read the same model from it (RoPE in both spellings, renamed keys under both names)
        and built without the installed transformers' defaults, so it is the same whichever version builds it.
        A layout with a transformers class is validated by it."""
        moe_keys = self.moe_keys()
        keys = {k: v for k, v in base_config.items() if k not in _NOT_CARRIED + _ROPE_KEYS and k not in moe_keys}
        keys.update(self.moe_config(shape))
        if self.derived_config is not None:
            keys.update(self.derived_config(keys))
        keys.update(rope_keys(base_config, parameters=self.rope_parameters))
        hidden, heads = keys.get("hidden_size"), keys.get("num_attention_heads")
        if keys.get("head_dim") is None and hidden and heads:
            keys["head_dim"] = hidden // heads  # what it is anyway; scaled-RoPE validation reads it
        for key, alias in self.aliases.items():
            keys[alias] = keys[key]
        config = {**keys, "architectures": list(self.architectures), "model_type": self.model_type,
                  "dtype": dtype, "torch_dtype": dtype}  # `dtype` since transformers 4.56, `torch_dtype` before
        if self.config_class is not None:
            import transformers

            # a copy: transformers 5 adopts and completes the rope_scaling dict it is given
            getattr(transformers, self.config_class)(**copy.deepcopy({k: v for k, v in config.items()
                                                                       if k != "model_type"}))
        return config


def rope_parameters(config: dict) -> dict:
    """A config's RoPE as transformers 5 reads it, whichever spelling the config uses: a non-empty legacy
    `rope_scaling` wins over `rope_parameters` and `rope_theta` fills in, as in transformers 5."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.pop("type", None)
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in _PRETRAINED_LENGTH:  # transformers 5: a top-level value wins, else the context length
        original = config.get("original_max_position_embeddings")
        if original is not None:
            params["original_max_position_embeddings"] = original
        elif config.get("max_position_embeddings") is not None:
            params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return params


def rope_keys(config: dict, parameters: bool = True) -> dict:
    """RoPE in both spellings: transformers 4.x and remote code read `rope_theta` and `rope_scaling` (None for
    plain RoPE; `type` for code older than `rope_type`), transformers 5 reads `rope_parameters` (with
    `parameters`). A config that carries both gives transformers 5 the same values either way."""
    params = rope_parameters(config)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    keys = {"rope_theta": params["rope_theta"],
            "rope_scaling": None if params["rope_type"] == "default" else {"type": params["rope_type"], **scaling}}
    if "partial_rotary_factor" in params:
        keys["partial_rotary_factor"] = params["partial_rotary_factor"]
    if params["rope_type"] == "longrope" and "original_max_position_embeddings" in params:
        keys["original_max_position_embeddings"] = params["original_max_position_embeddings"]  # 4.x reads it here
    if parameters:
        keys["rope_parameters"] = params
    return keys


def pack_shapes(layout: Layout, shapes: Dict[str, Tuple[int, ...]], num_layers: int, num_experts: int) -> None:
    """Replace the members of `layout`'s packed tensors in `shapes` (name -> shape) by the stored tensors."""
    for layer in range(num_layers):
        for packed in layout.packed:
            members = packed.members(layout, layer, num_experts)
            if not all(m in shapes for m in members):
                continue  # no shared expert
            member_shapes = [shapes.pop(m) for m in members]
            shapes[packed.stored_name(layer)] = packed.stored_shape(member_shapes, num_experts)


DEFAULT_ROPE_THETA = 10000.0  # what every input family's class assumes when config.json names no RoPE base
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
_PRETRAINED_LENGTH = ("llama3", "yarn", "longrope")  # RoPE types that read original_max_position_embeddings


# Identity and bookkeeping keys of the base, never carried into the MoE's config.
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
