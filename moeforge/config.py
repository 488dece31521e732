"""The YAML schema. Accepts every mergekit-moe config unchanged; rejects unknown keys."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeforge.errors import ConfigError

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "fitted"]
DType = Literal["float32", "float16", "bfloat16"]
RANDOM_GATE_MODES = ("random", "uniform_random")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    source_model: str = Field(min_length=1)
    positive_prompts: Optional[List[str]] = None
    negative_prompts: Optional[List[str]] = None
    noise_scale: Optional[float] = Field(default=None, ge=0)
    residual_scale: Optional[float] = None

    def prompts_key(self) -> tuple:
        return (tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ()))


class MoEConfig(_Strict):
    """A mergekit-moe compatible MoE recipe."""

    base_model: str = Field(min_length=1)
    experts: List[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: Optional[DType] = None
    experts_per_token: int = 2
    shared_experts: Optional[List[Expert]] = None
    architecture: Optional[str] = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        return aliases.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.experts_per_token < 1:
            raise ValueError("experts_per_token: must be >= 1")
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} experts listed"
            )
        if self.gate_mode in RANDOM_GATE_MODES:
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

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "MoEConfig":
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', None) or e})") from None
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "config") -> "MoEConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: expected a mapping of config keys, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{origin}: {describe_validation_error(e)}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True)


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
    if isinstance(config_or_path, MoEConfig):
        return config_or_path
    if isinstance(config_or_path, dict):
        return MoEConfig.from_dict(config_or_path)
    return MoEConfig.from_yaml(config_or_path)
