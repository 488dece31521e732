"""The YAML schema. Accepts every mergekit-moe config unchanged; unknown keys as `config_keys` says."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeforge.errors import ConfigError

log = logging.getLogger("moeforge")

from moeforge.gate_modes import GATE_MODE_NAMES, GATE_MODES, RANDOM_GATE_MODES  # noqa: F401 (re-exported)
from moeforge.layouts import layouts_matching

GateMode = Literal[GATE_MODE_NAMES]  # the gate-mode table's names, for validation and the JSON schema
DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class YamlConfig(_Strict):
    """A top-level config: loaded from YAML or a mapping, with one line per problem, naming the field."""

    # True: an unknown key that is no near miss of a known one is dropped with a warning (mergekit-moe's
    # configs); False: it is an error.
    ignores_unknown_keys: ClassVar[bool] = False

    @classmethod
    def from_yaml(cls, path: Union[str, Path], strict: bool = False):
        return cls.from_dict(read_yaml(path), origin=str(path), strict=strict)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "config", strict: bool = False):
        return validate_mapping(cls, data, origin, strict=strict or not cls.ignores_unknown_keys)

    @classmethod
    def load(cls, config_or_path, strict: bool = False):
        """An instance as it is, a mapping, or a YAML path. `strict`: every unknown key is an error."""
        if isinstance(config_or_path, cls):
            return config_or_path
        if isinstance(config_or_path, dict):
            return cls.from_dict(config_or_path, strict=strict)
        return cls.from_yaml(config_or_path, strict=strict)


class ModelSpec(_Strict):
    """`{model: ..., lora: ...}`, the long form of `model+lora`."""

    model: str = Field(min_length=1, description="The model the adapter was trained on: a local directory, `org/name` or `org/name@revision`.")
    lora: Optional[str] = Field(None, description="A PEFT LoRA adapter (directory or Hub id) whose delta is added to `model`'s tensors.")

    @field_validator("model", "lora", mode="before")
    @classmethod
    def _path_form(cls, v):
        """mergekit's `{path: org/name, revision: main}` is `org/name@main`."""
        if isinstance(v, dict) and set(v) <= {"path", "revision"} and isinstance(v.get("path"), str):
            return v["path"] + (f"@{v['revision']}" if v.get("revision") else "")
        return v

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else self.model


def _model_text(v):
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty")
    return v if v is None else str(v)


class LayerSource(_Strict):
    """One model's MLPs for the layers [start, end) of an expert (per-layer expert choice)."""

    model: Union[str, ModelSpec] = Field(description="The model these layers' MLPs come from: a reference, `model+adapter`, or `{model, lora}`.")
    layers: Tuple[int, int] = Field(description="`[start, end)`: the layers this model fills. The ranges of one expert cover every layer once.")

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
    """One expert: the model its MLPs come from and the prompts its router row is made from."""

    source_model: Optional[Union[str, ModelSpec]] = Field(None, description=(
        "The model whose MLPs this expert takes: a local directory, `org/name`, `org/name@revision`, "
        "`model+adapter` (a LoRA adapter applied to model) or `{model, lora}`. Give this or `sources`."))
    sources: Optional[List[LayerSource]] = Field(default=None, min_length=1, description=(
        "Per-layer models instead of `source_model`: `{model, layers: [start, end)}` entries that cover "
        "every layer of the base once."))
    positive_prompts: Optional[List[str]] = Field(None, description=(
        "Example inputs this expert should receive. Required unless `gate_mode` is `random` or "
        "`uniform_random`; `deepseek` shared experts take none."))
    negative_prompts: Optional[List[str]] = Field(None, description=(
        "Inputs this expert should not receive: subtracted from its router row (`hidden*`, `cheap_embed`) "
        "or fitted to a low probability (`fitted`)."))
    noise_scale: Optional[float] = Field(default=None, ge=0, description=(
        "Standard deviation of Gaussian noise added to this expert's weights, seeded per tensor from "
        "`--random-seed`."))
    residual_scale: Optional[float] = Field(None, description="Multiplies this expert's down_proj, so its output.")

    _as_text = field_validator("source_model", mode="after")(_model_text)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        """A single prompt written as a string is a list of one."""
        return [v] if isinstance(v, str) else v

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

    source_model: str = Field(min_length=1, description="The dense model to upcycle; it is also the base model.")
    num_experts: int = Field(ge=1, description="N: copies of the dense MLP (times `granularity` experts in all).")
    noise_scale: Optional[float] = Field(default=None, ge=0, description=(
        "Standard deviation of Gaussian noise added to each copy's weights, a different draw per copy."))
    drop_ratio: float = Field(default=0.0, ge=0, le=1, description=(
        "Drop-Upcycling's r: per layer and expert, this share of intermediate neurons is re-drawn from "
        "N(mean, std) of its matrix."))
    granularity: int = Field(default=1, ge=1, description=(
        "Fine-grained experts: each copy is split into g segments of intermediate_size/g neurons, so g*N "
        "experts and top-k times g; the build starts equal to the dense model."))


class MoEConfig(YamlConfig):
    """A mergekit-moe compatible MoE recipe (or an `upcycle:` block that expands into one)."""

    ignores_unknown_keys: ClassVar[bool] = True  # as mergekit-moe does, but said

    base_model: str = Field(min_length=1, description=(
        "The model whose attention, norms, embeddings, lm_head and tokenizer the MoE keeps: a local "
        "directory, `org/name` or `org/name@revision`. Not allowed with `upcycle`."))
    experts: List[Expert] = Field(min_length=1, description=(
        "The routed experts, in router order. Each gives the MLP of every layer. Not allowed with `upcycle`."))
    gate_mode: GateMode = Field("hidden", description=(
        "How router weights are made: `hidden`/`hidden_last`, `hidden_avg`, `cheap_embed`, `random`, "
        "`uniform_random` (mergekit-moe's modes) or `fitted` (fitted to the prompts' router inputs). "
        "See docs/gate-modes.md. With `upcycle` the default is `uniform_random`."))
    dtype: Optional[DType] = Field(None, description=(
        "Output dtype (`fp32`, `fp16`, `half`, `bf16` are accepted too). Default: the base model's dtype."))
    experts_per_token: int = Field(2, description="Top-k: the number of routed experts each token goes to.")
    shared_experts: Optional[List[Expert]] = Field(None, description=(
        "Experts every token goes through. `qwen`: one or more, joined into the one gated shared expert "
        "(their prompts make its gate). `deepseek`: any number, ungated, without prompts."))
    architecture: Optional[str] = Field(None, description=(
        "Output layout, for example `mixtral`, `qwen`, `qwen3` or `deepseek` (all of them: docs/layouts.md). "
        "Default: the first layout that accepts the inputs and the shared experts."))
    renormalize: Optional[bool] = Field(None, description=(
        "Rescale the top-k router weights to sum to 1 (`norm_topk_prob`). Default true: identical experts then "
        "reproduce the dense base. Where either value computes differently in a runtime (llama.cpp), the build "
        "says so: docs/runtimes.md."))
    upcycle: Optional[Upcycle] = Field(None, description=(
        "Sparse upcycling: one dense model becomes the base and N expert copies. Replaces `base_model`, "
        "`experts` and `shared_experts`."))

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


def validate_mapping(model_class, data: Any, origin: str = "config", strict: bool = True):
    """`model_class` validated from a mapping. Every problem is one line of the ConfigError: unknown keys
    first (near misses always; the others only when `strict`, else they are dropped with a warning), then the
    schema's."""
    from moeforge.config_keys import split_unknown_keys

    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of config keys, got {type(data).__name__}")
    data, unknown = split_unknown_keys(model_class, data)
    problems = []
    for u in unknown:
        problem = u.problem(strict)
        if problem:
            problems.append(problem)
        else:
            log.warning("%s: %s: unknown key, ignored (mergekit-moe ignores it too; --strict makes it an error)",
                        origin, u.where)
    try:
        result = model_class.model_validate(data)
    except ValidationError as e:
        problems += validation_problems(e)
    if problems:
        raise ConfigError("\n".join(f"{origin}: {p}" for p in problems)) from None
    return result


def validation_problems(e: ValidationError) -> List[str]:
    """Every problem, as `field.path: message`, one line each. Of a union (`source_model`: a string or
    {model, lora}), only the branch the value was meant for is reported, without pydantic's branch tag."""
    errors = _meant_branches(e.errors())
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{err['input']!r} is not one of {err['ctx']['expected']}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        line = f"{loc}: {msg}" if loc else msg
        if line not in lines:
            lines.append(line)
    return lines


_WRONG_TYPE = {"string_type", "model_type", "dict_type", "list_type", "int_type", "float_type", "bool_type",
               "tuple_type", "model_attributes_type"}


def _branch_tag(part) -> bool:
    """pydantic's name for a union member in an error location: `str`, `ModelSpec`, `list[str]`."""
    return isinstance(part, str) and (part[:1].isupper() or part.split("[")[0] in ("str", "int", "float", "list",
                                                                                   "dict", "tuple", "bool"))


def _meant_branches(errors: List[dict]) -> List[dict]:
    tagged: dict = {}
    for err in errors:
        i = next((i for i, part in enumerate(err["loc"]) if _branch_tag(part)), None)
        if i is not None:
            tagged.setdefault(err["loc"][:i], []).append((err["loc"][i], err))
    out = []
    for err in errors:
        i = next((i for i, part in enumerate(err["loc"]) if _branch_tag(part)), None)
        if i is None:
            out.append(err)
            continue
        prefix, branches = err["loc"][:i], tagged[err["loc"][:i]]
        fitting = {tag for tag, e in branches if e["type"] not in _WRONG_TYPE or len(e["loc"]) > i + 1}
        if fitting and err["loc"][i] not in fitting:
            continue  # the value was meant for another branch
        if fitting:
            out.append({**err, "loc": prefix + err["loc"][i + 1:]})
        else:  # no branch fits: one line listing what is expected
            wanted = " or ".join(e["msg"].replace("Input should be ", "") for _, e in branches)
            out.append({**err, "loc": prefix, "msg": f"Input should be {wanted}"})
    return out


def describe_validation_error(e: ValidationError) -> str:
    """Every problem, one line each."""
    return "\n".join(validation_problems(e))


def load_config(config_or_path: Union[MoEConfig, dict, str, Path], strict: bool = False) -> MoEConfig:
    return MoEConfig.load(config_or_path, strict=strict)
