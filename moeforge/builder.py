"""`moeforge build`: config -> sources -> checks -> gates -> plan -> writer -> output directory."""
from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple, Union

from moeforge._version import __version__
from moeforge.config import Expert, MoEConfig, load_config
from moeforge.errors import ConfigError, SourceError
from moeforge.options import BuildOptions, parse_shard_size
from moeforge.sources.checkpoint import CODE_OF, DTYPES, Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from moeforge.families import Family
    from moeforge.layouts import Layout
    from moeforge.plan import MoEPlan

log = logging.getLogger("moeforge")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
)
RESOLVED_CONFIG = "moeforge_config.yml"


@dataclasses.dataclass
class BuildResult:
    out_dir: Path
    layout: str
    num_experts: int
    experts_per_token: int
    files: List[str]
    total_params: int
    active_params: int
    random_seed: int

    def summary(self) -> str:
        return (
            f"wrote {self.out_dir}: {self.layout} layout, {self.num_experts} experts (top-{self.experts_per_token}), "
            f"{human(self.total_params)} parameters, {human(self.active_params)} active per token, "
            f"{len(self.files)} shard(s)"
        )


@dataclasses.dataclass
class Inputs:
    """Everything known about a build before any tensor data is read."""

    config: MoEConfig
    options: BuildOptions
    base: Checkpoint
    experts: List[Tuple[Expert, Checkpoint]]
    family: "Family"
    layout: "Layout"
    num_layers: int
    hidden_size: int
    out_dtype: str  # safetensors code
    seed: int
    checkpoints: Dict[str, Checkpoint]

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


def build(config_or_path: Union[MoEConfig, dict, str, Path], out_dir: Union[str, Path], **options) -> BuildResult:
    """Build an MoE checkpoint at `out_dir`. Keyword options are the CLI flags (see `BuildOptions`)."""
    from moeforge.writer.output_dir import check_output_path

    config = load_config(config_or_path)
    from moeforge.gates.loading import check_load_options

    opts = BuildOptions.from_kwargs(**options)
    check_load_options(opts)
    check_output_path(Path(out_dir), opts.overwrite)
    inputs = open_inputs(config, opts)
    try:
        return write_output(inputs, plan_tensors(inputs), Path(out_dir))
    finally:
        inputs.close()


def open_inputs(config: MoEConfig, opts: BuildOptions) -> Inputs:
    """Resolve and check every source (configs and headers only) and choose the layout."""
    from moeforge.families import family_of
    from moeforge.layouts import select_layout

    checkpoints: Dict[str, Checkpoint] = {}

    def open_once(ref: str) -> Checkpoint:
        if ref not in checkpoints:
            checkpoints[ref] = open_checkpoint(ref)
        return checkpoints[ref]

    base = open_once(config.base_model)
    experts = [(e, open_once(e.source_model)) for e in config.experts]
    family = family_of(base)
    for expert, ckpt in experts:
        other = family_of(ckpt)
        if other.name != family.name:
            raise SourceError(
                f"{expert.source_model}: is a {other.name} model but the base is {family.name}; "
                "all inputs must be of one family"
            )
    features = family.features(base).union(*(family.features(c) for _, c in experts))
    layout = select_layout(config.architecture, family.name, features, len(config.shared_experts or []))
    _check_not_all_same(config, opts)
    num_layers, hidden = _check_shapes(base, experts, family)
    seed = opts.random_seed if opts.random_seed is not None else secrets.randbelow(2**31)
    return Inputs(config, opts, base, experts, family, layout, num_layers, hidden, _output_dtype(config, base), seed,
                  checkpoints)


def plan_tensors(inputs: Inputs) -> "MoEPlan":
    """Compute the routers, then plan every output tensor."""
    from moeforge.gates import GateInputs, compute_gates
    from moeforge.plan import plan_moe

    config, n_layers = inputs.config, inputs.num_layers
    # the base model, if a gate mode runs it, is loaded and freed inside compute_gates: before any writing
    gates = compute_gates(
        config.gate_mode,
        GateInputs(inputs.base, [e for e, _ in inputs.experts], n_layers, inputs.hidden_size, inputs.seed,
                   inputs.options, num_routed=len(inputs.experts), checkpoints=[c for _, c in inputs.experts]),
    )
    n_experts = len(inputs.experts)
    if inputs.layout.name == "mixtral" and n_experts & (n_experts - 1):
        log.warning("%d experts is not a power of two: llama.cpp cannot run this model", n_experts)
    return plan_moe(inputs.base, inputs.family, inputs.layout, inputs.experts, gates, inputs.out_dtype,
                    inputs.seed, n_layers, config.experts_per_token)


def write_output(inputs: Inputs, plan: "MoEPlan", out_dir: Path) -> BuildResult:
    """Shards, then the side files, into a temporary directory that becomes `out_dir` when complete."""
    from tqdm.auto import tqdm

    from moeforge.writer import atomic_output_dir, write_sharded

    opts = inputs.options
    shard_bytes = parse_shard_size(opts.out_shard_size, DTYPES[inputs.out_dtype][1])
    with atomic_output_dir(out_dir, opts.overwrite) as tmp:
        with tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="writing", disable=opts.quiet) as bar:
            written = write_sharded(tmp, plan.tensors, shard_bytes, bar)
        for write_side_file in SIDE_FILES:
            write_side_file(tmp, inputs, plan)
    result = BuildResult(
        out_dir, inputs.layout.name, len(inputs.experts), inputs.config.experts_per_token, written.files,
        plan.total_params, plan.active_params, inputs.seed,
    )
    log.info(result.summary())
    return result


def _model_config(out: Path, inputs: Inputs, plan) -> None:
    config = inputs.layout.model_config(inputs.base.config, plan.shape, DTYPES[inputs.out_dtype][0])
    config.save_pretrained(str(out))


def _resolved_config(out: Path, inputs: Inputs, plan) -> None:
    (out / RESOLVED_CONFIG).write_text(
        f"# moeforge {__version__}; rebuild with: moeforge build {RESOLVED_CONFIG} OUT --random-seed {inputs.seed}\n"
        + inputs.config.to_yaml(),
        encoding="utf-8",
    )


def _base_side_files(out: Path, inputs: Inputs, plan) -> None:
    """generation_config.json and (unaltered) tokenizer files from the base."""
    base, copy_tokenizer = inputs.base, inputs.options.copy_tokenizer
    names = ["generation_config.json"] + (list(TOKENIZER_FILES) if copy_tokenizer else [])
    copied = []
    for name in names:
        src = base.path / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    if copy_tokenizer and not any(n in copied for n in TOKENIZER_FILES):
        log.warning("%s: has no tokenizer files to copy", base.label)


# Files written beside the shards, in order: (tmp_dir, inputs, plan) -> None.
SIDE_FILES = [_model_config, _base_side_files, _resolved_config]


def human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _check_not_all_same(config: MoEConfig, opts: BuildOptions) -> None:
    sources = {e.source_model for e in config.experts}
    if len(config.experts) > 1 and len(sources) == 1 and not opts.allow_all_same:
        raise ConfigError(
            "experts: every expert is the same model, which costs more and computes the same; if you will train "
            "it afterwards, pass --i-understand-this-is-not-useful-without-training"
        )


def _check_shapes(base: Checkpoint, experts, family):
    """Every expert must fit the base: same hidden size and depth, MLP tensors present with one shape."""
    hidden = base.config_value("hidden_size")
    num_layers = base.config_value("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(num_layers, int):
        raise SourceError(f"{base.path / 'config.json'}: needs integer hidden_size and num_hidden_layers")
    first_shapes = None
    for expert, ckpt in experts:
        for key, want in (("hidden_size", hidden), ("num_hidden_layers", num_layers)):
            got = ckpt.config_value(key)
            if got != want:
                raise SourceError(f"{expert.source_model}: {key} is {got}, but the base model's is {want}")
        for layer in range(num_layers):
            shapes = {r: ckpt.ref(family.mlp_name(r, layer)).shape for r in ("gate", "up", "down")}
            inter = shapes["gate"][0]
            want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
            if shapes != want:
                raise SourceError(f"{expert.source_model}: layer {layer} MLP shapes {shapes} do not fit hidden size {hidden}")
            if first_shapes is None:
                first_shapes = shapes
            elif shapes != first_shapes:
                raise SourceError(
                    f"{expert.source_model}: intermediate size {inter} differs from the first expert's "
                    f"{first_shapes['gate'][0]} (experts of one layout must match)"
                )
    return num_layers, hidden


def _output_dtype(config: MoEConfig, base: Checkpoint) -> str:
    name = config.dtype or base.config_value("torch_dtype") or base.config_value("dtype")
    if isinstance(name, str) and name in CODE_OF and CODE_OF[name] in ("F32", "F16", "BF16"):
        return CODE_OF[name]
    return base.ref(next(iter(base.tensors))).dtype
