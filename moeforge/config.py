"""The YAML schema. Accepts every mergekit-moe config unchanged; rejects unknown keys."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeforge.errors import ConfigError

from moeforge.gate_modes import GATE_MODE_NAMES, GATE_MODES, RANDOM_GATE_MODES  # noqa: F401 (re-exported)
from moeforge.layouts import layouts_matching

GateMode = Literal[GATE_MODE_NAMES]  # the gate-mode table's names, for validation and the JSON schema
DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class YamlConfig(_Strict):
    """A top-level config: loaded from YAML or a mapping, with one-line errors naming the field."""

    @classmethod
    def from_yaml(cls, path: Union[str, Path]):
        return cls.from_dict(read_yaml(path), origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "config"):
        return validate_mapping(cls, data, origin)

    @classmethod
    def load(cls, config_or_path):
        """An instance as it is, a mapping, or a YAML path."""
        if isinstance(config_or_path, cls):
            return config_or_path
        if isinstance(config_or_path, dict):
            return cls.from_dict(config_or_path)
        return cls.from_yaml(config_or_path)


class ModelSpec(_Strict):
    """`{model: ..., lora: ...}`, the long form of `model+lora`."""

    model: str = Field(min_length=1)
    lora: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else self.model


def _model_text(v):
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty")
    return v if v is None else str(v)


class LayerSource(_Strict):
    """One model's MLPs for the layers [start, end) of an expert (per-layer expert choice)."""

    model: Union[str, ModelSpec]
    layers: Tuple[int, int]

    _as_text = field_validator("model", mode="after")(_model_text)

    @field_validator("layers", mode="after")
    @classmethod
    def _range(cls, v):
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"[{v[0]}, {v[1]}] is not a layer range [start, end) with 0 <= start < end")
        return v

    def __str__(self) -> str:
        return f"{self.model}[{self.layers[0]}:{self.layers[1]}]"


class Expert(_Strict):
    source_model: Optional[Union[str, ModelSpec]] = None
    sources: Optional[List[LayerSource]] = Field(default=None, min_length=1)
    positive_prompts: Optional[List[str]] = None
    negative_prompts: Optional[List[str]] = None
    noise_scale: Optional[float] = Field(default=None, ge=0)
    residual_scale: Optional[float] = None

    _as_text = field_validator("source_model", mode="after")(_model_text)

    @field_validator("sources", mode="after")
    @classmethod
    def _tiled(cls, v):
        """Ranges in order, from layer 0, without gaps or overlaps (the end is checked against the base)."""
        if v is None:
            return v
        ranges = sorted(s.layers for s in v)
        if ranges[0][0] != 0:
            raise ValueError(f"layer ranges start at {ranges[0][0]}, not 0: layers 0..{ranges[0][0] - 1} have no source")
        for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                raise ValueError(f"layer ranges [{s0}, {e0}) and [{s1}, {e1}) overlap")
            if s1 > e0:
                raise ValueError(f"layer ranges [{s0}, {e0}) and [{s1}, {e1}) leave layers {e0}..{s1 - 1} without a source")
        return sorted(v, key=lambda s: s.layers)

    @model_validator(mode="after")
    def _one_source(self) -> "Expert":
        if (self.source_model is None) == (self.sources is None):
            raise ValueError("give exactly one of source_model or sources (per-layer models)")
        return self

    @property
    def label(self) -> str:
        """The model reference, or the per-layer sources, for messages."""
        return self.source_model if self.sources is None else " + ".join(map(str, self.sources))

    def models(self) -> List[str]:
        return [self.source_model] if self.sources is None else [str(s.model) for s in self.sources]

    def prompts_key(self) -> tuple:
        return (tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ()))


class Upcycle(_Strict):
    """One dense model becomes N experts (sparse upcycling); see moeforge/plan/upcycle.py."""

    source_model: str = Field(min_length=1)
    num_experts: int = Field(ge=1)
    noise_scale: Optional[float] = Field(default=None, ge=0)
    drop_ratio: float = Field(default=0.0, ge=0, le=1)  # Drop-Upcycling's r
    granularity: int = Field(default=1, ge=1)  # fine-grained experts: g segments per copy


class MoEConfig(YamlConfig):
    """A mergekit-moe compatible MoE recipe (or an `upcycle:` block that expands into one)."""

    base_model: str = Field(min_length=1)
    experts: List[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: Optional[DType] = None
    experts_per_token: int = 2
    shared_experts: Optional[List[Expert]] = None
    architecture: Optional[str] = None
    upcycle: Optional[Upcycle] = None

    @model_validator(mode="before")
    @classmethod
    def _expand_upcycle(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("upcycle"), dict):
            return data
        for key in ("base_model", "experts", "shared_experts"):
            if key in data:
                raise ValueError(f"{key}: not allowed with upcycle (upcycle derives it from upcycle.source_model)")
        up = data["upcycle"]
        src, n, g = up.get("source_model"), up.get("num_experts"), up.get("granularity", 1)
        if not isinstance(n, int) or not isinstance(g, int) or n < 1 or g < 1:
            return {**data, "base_model": src, "experts": []}  # field validation reports the bad value
        expert = {"source_model": src, **({"noise_scale": up["noise_scale"]} if up.get("noise_scale") else {})}
        data = {"gate_mode": "uniform_random", **data, "base_model": src, "experts": [expert] * (n * g)}
        layouts = layouts_matching(str(data.get("architecture") or ""))
        if data.get("architecture") and layouts and layouts[0].min_shared_experts:  # silent copies (residual 0)
            data["shared_experts"] = [{"source_model": src, "residual_scale": 0.0}] * layouts[0].min_shared_experts
        return data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        return aliases.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.experts_per_token < 1:
            raise ValueError("experts_per_token: must be >= 1")
        if self.upcycle is not None and self.experts_per_token > self.upcycle.num_experts:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than upcycle.num_experts {self.upcycle.num_experts}"
            )
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} experts listed"
            )
        if not GATE_MODES[self.gate_mode].needs_prompts:
            return self
        for i, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise ValueError(
                    f"experts.{i}.positive_prompts: required with gate_mode '{self.gate_mode}' "
                    "(or use gate_mode random/uniform_random)"
                )
        if len(self.experts) > 1 and len({e.prompts_key() for e in self.experts}) == 1:
            raise ValueError(
                "experts: every expert has the same positive and negative prompts, so the router cannot tell them apart"
            )
        return self

    def to_yaml(self) -> str:
        import yaml

        derived = {"base_model", "experts", "shared_experts"} if self.upcycle else set()
        data = self.model_dump(exclude_none=True, exclude=derived)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def read_yaml(path: Union[str, Path]) -> Any:
    """A YAML file's contents; unreadable files and bad YAML are one-line ConfigErrors."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', None) or e})") from None


def validate_mapping(model_class, data: Any, origin: str = "config"):
    """`model_class` validated from a mapping; the first problem becomes a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return model_class.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {describe_validation_error(e)}") from None


def describe_validation_error(e: ValidationError) -> str:
    """The first problem, as `field.path: message`, in one line."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling)"
    elif err["type"] == "literal_error":
        msg = f"{err['input']!r} is not one of {err['ctx']['expected']}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ": " in msg and not loc:
            return msg
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def load_config(config_or_path: Union[MoEConfig, dict, str, Path]) -> MoEConfig:
    return MoEConfig.load(config_or_path)
