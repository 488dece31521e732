"""`moeforge build`: config -> sources -> checks -> gates -> plan -> writer -> output directory."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

from moeforge._version import __version__
from moeforge.config import RANDOM_GATE_MODES, Expert, MoEConfig, load_config
from moeforge.errors import ConfigError, SourceError
from moeforge.options import BuildOptions, parse_shard_size
from moeforge.sources.checkpoint import CODE_OF, DTYPES, Checkpoint

if TYPE_CHECKING:
    from moeforge.families import Family
    from moeforge.layouts import Layout
    from moeforge.plan import MoEPlan
    from moeforge.plan.report import PlanReport

log = logging.getLogger("moeforge")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
)
RESOLVED_CONFIG = "moeforge_config.yml"
# Gate modes that never load the base model: cheap enough to compute while the writer copies.
OVERLAPPED_GATE_MODES = RANDOM_GATE_MODES + ("cheap_embed",)


@dataclasses.dataclass
class BuildResult:
    out_dir: Path
    layout: str
    layout_inferred: bool
    num_experts: int
    experts_per_token: int
    files: List[str]
    dense_params: int  # the base model's, for the "7.24B -> 24.15B" comparison
    total_params: int
    active_params: int
    random_seed: int
    hub_url: Optional[str] = None  # set when pushed to the Hub

    def summary(self) -> str:
        inferred = " (inferred)" if self.layout_inferred else ""
        return (
            f"wrote {self.out_dir}: {self.layout} layout{inferred}, {self.num_experts} experts "
            f"(top-{self.experts_per_token}); parameters: dense base {human(self.dense_params)} -> "
            f"{human(self.total_params)} total, {human(self.active_params)} active per token; "
            f"{len(self.files)} shard(s)"
        )


@dataclasses.dataclass
class Inputs:
    """Everything known about a build before any tensor data is read."""

    config: MoEConfig
    options: BuildOptions
    base: Checkpoint
    experts: List[Tuple[Expert, Checkpoint]]
    shared: List[Tuple[Expert, Checkpoint]]
    family: "Family"  # the base's: it decides every non-MLP tensor
    layout: "Layout"
    layout_inferred: bool
    num_layers: int
    hidden_size: int
    out_dtype: str  # safetensors code
    seed: int
    checkpoints: Dict[str, Checkpoint]

    def family_of(self, ckpt: Checkpoint) -> "Family":
        from moeforge.families import family_of

        return family_of(ckpt)

    @property
    def granularity(self) -> int:
        return self.config.upcycle.granularity if self.config.upcycle else 1

    @property
    def experts_per_token(self) -> int:
        return self.config.experts_per_token * self.granularity

    def expert_extras(self, index: int, layer: int, role: str, intermediate: int) -> dict:
        """Upcycling's per-tensor transforms for routed expert `index`; none for a plain build."""
        if self.config.upcycle is None:
            return {}
        from moeforge.plan.upcycle import expert_extras

        return expert_extras(self, index, layer, role, intermediate)

    @property
    def gated(self) -> List[Tuple[Expert, Checkpoint]]:
        """Experts that get a router row: the routed ones, then a gated shared expert (several shared experts
        are one MLP under one gate, whose row comes from all their prompts together)."""
        if not (self.layout.shared_router and self.shared):
            return self.experts
        if len(self.shared) == 1:
            return self.experts + self.shared
        joined = Expert.model_construct(
            source_model=" + ".join(e.label for e, _ in self.shared),
            positive_prompts=[p for e, _ in self.shared for p in e.positive_prompts or []],
            negative_prompts=[p for e, _ in self.shared for p in e.negative_prompts or []] or None,
        )
        return self.experts + [(joined, self.shared[0][1])]

    @property
    def base_params(self) -> int:
        return sum(math.prod(ref.shape) for name, ref in self.base.tensors.items() if not self.family.is_skipped(name))

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


def build(config_or_path: Union[MoEConfig, dict, str, Path], out_dir: Union[str, Path], **options) -> BuildResult:
    """Build an MoE checkpoint at `out_dir`. Keyword options are the CLI flags (see `BuildOptions`)."""
    from moeforge.writer.output_dir import check_output_path
    from moeforge.writer.resume import BuildSession

    config = load_config(config_or_path)
    from moeforge.gates.loading import check_load_options

    opts = BuildOptions.from_kwargs(**options)
    check_load_options(opts)
    check_output_path(Path(out_dir), opts.overwrite)
    token = None
    if opts.private and not opts.push_to_hub:
        raise ConfigError("--private: only with --push-to-hub")
    if opts.push_to_hub:  # fail before the build, not after it
        from moeforge.hub import check_repo_id, require_token

        check_repo_id(opts.push_to_hub)
        token = require_token()
    inputs = open_inputs(config, opts)
    try:
        session = BuildSession.open(Path(out_dir), inputs)  # with --resume, fixes the seed before planning
        result = write_output(inputs, plan_tensors(inputs), Path(out_dir), session)
    finally:
        inputs.close()
    if opts.push_to_hub:
        from moeforge.hub import push_build

        result.hub_url = push_build(result.out_dir, opts.push_to_hub, private=opts.private, token=token)
    return result


def open_inputs(config: MoEConfig, opts: BuildOptions) -> Inputs:
    """Resolve and check every source and choose the layout, reading only configs and safetensors headers:
    every refusal comes before any weight is downloaded, and each source is opened only once the ones before
    it passed. Hub weights are downloaded at the end (`materialize`)."""
    from moeforge.families import family_of, open_dense
    from moeforge.checks.sources import check_base_tensors, check_expert_vocab
    from moeforge.layouts import select_layout

    if config.upcycle is None:
        _check_not_all_same(config, opts)
    checkpoints: Dict[str, Checkpoint] = {}

    def open_once(ref: str) -> Checkpoint:
        if ref not in checkpoints:
            checkpoints[ref] = open_dense(ref)
        return checkpoints[ref]

    try:
        base = open_once(config.base_model)
        family = family_of(base)
        layout, inferred = select_layout(config.architecture, family.name, family.features(base),
                                         config.shared_experts or [], config.gate_mode)
        num_layers, hidden = _base_dims(base)
        if config.upcycle is not None:
            from moeforge.plan.upcycle import check_granularity

            check_granularity(base.ref(family.mlp_name("gate", 0)).shape[0], config.upcycle.granularity)
        for where, expert in _all_experts(config):
            _check_layer_ranges(where, expert, num_layers)
        checked = ExpertChecks((family.name,), f"the base is {family.name}", "the base model's", layout,
                               num_layers, hidden, opts)
        experts = [(e, checked(e, _open_expert(e, open_once), False)) for e in config.experts]
        shared = [(e, checked(e, _open_expert(e, open_once), True)) for e in config.shared_experts or []]
        check_base_tensors(base, family, num_layers, hidden)
        check_expert_vocab(base, experts + shared)
        for ckpt in checkpoints.values():
            ckpt.materialize()
    except BaseException:
        for ckpt in checkpoints.values():
            ckpt.close()
        raise
    seed = opts.random_seed if opts.random_seed is not None else secrets.randbelow(2**31)
    inputs = Inputs(config, opts, base, experts, shared, family, layout, inferred, num_layers, hidden,
                    _output_dtype(config, base), seed, checkpoints)
    _check_gate_sources(inputs)
    return inputs


def _check_gate_sources(inputs: Inputs) -> None:
    """What the gate mode will read, checked now: a routers' failure would otherwise come after the checks."""
    mode = inputs.config.gate_mode
    if mode in RANDOM_GATE_MODES:
        return
    base = inputs.base
    if not any((base.path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{base.label}: has no tokenizer files, which gate_mode {mode} needs to read the prompts")
    if mode == "cheap_embed":
        from moeforge.gates import GateInputs

        base.ref(GateInputs.embed_name)


def _all_experts(config: MoEConfig):
    yield from ((f"experts.{i}", e) for i, e in enumerate(config.experts))
    yield from ((f"shared_experts.{i}", e) for i, e in enumerate(config.shared_experts or []))


def _open_expert(expert: Expert, open_once):
    """The expert's checkpoint, or a LayeredSource over its per-layer sources."""
    from moeforge.sources.layered import LayeredSource

    if expert.sources is None:
        return open_once(expert.source_model)
    return LayeredSource(expert.label, [(s.layers, open_once(str(s.model))) for s in expert.sources])


def _check_layer_ranges(where: str, expert: Expert, num_layers: int) -> None:
    if expert.sources is not None and expert.sources[-1].layers[1] != num_layers:
        end = expert.sources[-1].layers[1]
        raise ConfigError(f"{where}.sources: layer ranges end at {end}, but the base model has {num_layers} layers"
                          " (ranges must cover [0, num_layers) exactly)")


def dry_run(config_or_path: Union[MoEConfig, dict, str, Path], out_dir: Union[str, Path, None] = None,
            **options) -> "PlanReport":
    """Check every source and size the build from configs and headers only: no tensor data is read, no gate
    computed, nothing written. Options are `build`'s. The report's `lines()` is what `moeforge plan` prints."""
    from moeforge.plan.report import make_report
    from moeforge.writer.output_dir import check_output_path

    config = load_config(config_or_path)
    opts = BuildOptions.from_kwargs(**options)
    if out_dir is not None:
        check_output_path(Path(out_dir), opts.overwrite)
    inputs = open_inputs(config, opts)
    try:
        return make_report(inputs, plan_tensors(inputs, compute_routers=False),
                           Path(out_dir) if out_dir is not None else None, shard_bytes(inputs))
    finally:
        inputs.close()


def shard_bytes(inputs: Inputs) -> int:
    return parse_shard_size(inputs.options.out_shard_size, DTYPES[inputs.out_dtype][1])


def plan_tensors(inputs: Inputs, compute_routers: bool = True) -> "MoEPlan":
    """Plan every output tensor. The routers are planned by shape (`Deferred`): gate modes that run the base
    model compute them here, so it is freed before writing; the others are computed while the writer copies
    (`compute_routers=False`, for a dry run: never)."""
    from moeforge.plan import plan_moe
    from moeforge.plan.tensors import Deferred

    n_layers, n_routed, g = inputs.num_layers, len(inputs.experts), inputs.granularity
    gated = inputs.experts[::g] + inputs.gated[n_routed:]  # one row per copy when experts are fine-grained
    n_rows = n_routed // g
    gates = Deferred((n_layers, len(gated), inputs.hidden_size), lambda: _compute_gates(inputs, gated, n_rows))
    if compute_routers and inputs.config.gate_mode not in OVERLAPPED_GATE_MODES:
        gates.value()
    routed = gates.map((n_layers, n_routed, inputs.hidden_size), lambda x: x[:, :n_rows].repeat_interleave(g, dim=1))
    shared = gates.map((n_layers, len(gated) - n_rows, inputs.hidden_size), lambda x: x[:, n_rows:])
    if inputs.layout.name == "mixtral" and n_routed & (n_routed - 1):
        log.warning("%d experts is not a power of two: llama.cpp cannot run this model", n_routed)
    return plan_moe(inputs, routed, shared)


def _compute_gates(inputs: Inputs, gated, n_rows: int):
    from moeforge.gates import GateInputs, compute_gates

    return compute_gates(
        inputs.config.gate_mode,
        GateInputs(inputs.base, [e for e, _ in gated], inputs.num_layers, inputs.hidden_size, inputs.seed,
                   inputs.options, num_routed=n_rows, checkpoints=[c for _, c in gated]),
    )


def write_output(inputs: Inputs, plan: "MoEPlan", out_dir: Path, session=None) -> BuildResult:
    """Shards, the side files, then the manifest, into a partial directory that becomes `out_dir` when complete."""
    from tqdm.auto import tqdm

    from moeforge.checks.disk import check_free_space, output_bytes
    from moeforge.checks.finite import scan_raw_copies
    from moeforge.writer import write_sharded
    from moeforge.writer.background import Background
    from moeforge.writer.resume import BuildSession

    opts = inputs.options
    max_shard = shard_bytes(inputs)
    session = session or BuildSession.open(out_dir, inputs)
    side_names = ["generation_config.json"] + (list(TOKENIZER_FILES) if opts.copy_tokenizer else [])
    if opts.check_finite:
        scan_raw_copies(plan.tensors)
    session.discard_stale()
    check_free_space(out_dir, output_bytes(plan, inputs.base.path, side_names) - session.reusable_bytes())
    with session.partial_dir() as tmp:
        with Background(_computed_parts, inputs, plan, tmp) as computed, \
                tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="writing", disable=opts.quiet) as bar:
            written = write_sharded(tmp, plan.tensors, max_shard, bar, journal=session)
            computed.result()
        session.write_manifest(tmp)
    result = BuildResult(
        out_dir, inputs.layout.name, inputs.layout_inferred, len(inputs.experts), inputs.experts_per_token,
        written.files, inputs.base_params, plan.total_params, plan.active_params, inputs.seed,
    )
    log.info(result.summary())
    return result


def _computed_parts(inputs: Inputs, plan: "MoEPlan", tmp: Path) -> None:
    """The routers not computed yet and the side files, on a helper thread while the shards are copied."""
    plan.compute_values()
    for write_side_file in SIDE_FILES:
        write_side_file(tmp, inputs, plan)


def write_checkpoint(out_dir: Path, tensors, shard_bytes: int, opts: BuildOptions, side_files):
    """Shards, then `side_files(tmp)`, into a temporary directory that becomes `out_dir` when complete."""
    from tqdm.auto import tqdm

    from moeforge.writer import atomic_output_dir, write_sharded

    with atomic_output_dir(out_dir, opts.overwrite) as tmp:
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=opts.quiet) as bar:
            written = write_sharded(tmp, tensors, shard_bytes, bar)
        side_files(tmp)
    return written


def _model_config(out: Path, inputs: Inputs, plan) -> None:
    config = inputs.layout.model_config(inputs.family.output_config(inputs.base.config), plan.shape,
                                        DTYPES[inputs.out_dtype][0])
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _resolved_config_text(inputs: Inputs) -> str:
    return (
        f"# moeforge {__version__}; rebuild with: moeforge build {RESOLVED_CONFIG} OUT --random-seed {inputs.seed}\n"
        + inputs.config.to_yaml()
    )


def _resolved_config(out: Path, inputs: Inputs, plan) -> None:
    (out / RESOLVED_CONFIG).write_text(_resolved_config_text(inputs), encoding="utf-8")


def _model_card(out: Path, inputs: Inputs, plan) -> None:
    from moeforge.card import CARD_NAME, build_card

    build_card(inputs, plan, _resolved_config_text(inputs), RESOLVED_CONFIG).save(out / CARD_NAME)


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
SIDE_FILES = [_model_config, _base_side_files, _resolved_config, _model_card]


def human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _check_not_all_same(config: MoEConfig, opts: BuildOptions) -> None:
    sources = {e.label for e in config.experts}
    if len(config.experts) > 1 and len(sources) == 1 and not opts.allow_all_same:
        raise ConfigError(
            "experts: every expert is the same model, which costs more and computes the same; if you will train "
            "it afterwards, pass --i-understand-this-is-not-useful-without-training"
        )


def _base_dims(base: Checkpoint) -> Tuple[int, int]:
    hidden = base.config_value("hidden_size")
    num_layers = base.config_value("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(num_layers, int):
        raise SourceError(f"{base.path / 'config.json'}: needs integer hidden_size and num_hidden_layers")
    return num_layers, hidden


class ExpertChecks:
    """Every expert must fit the base: family (unless --allow-crimes), hidden size, depth, and MLP tensors
    present and consistent; routed experts (and shared ones, where the layout gives them the routed width) share
    one intermediate size."""

    def __init__(self, families: Tuple[str, ...], family_rule: str, whose: str, layout, num_layers: int, hidden: int,
                 opts: BuildOptions, routed_inter=None):
        self.families, self.family_rule, self.whose, self.layout, self.opts = families, family_rule, whose, layout, opts
        self.num_layers, self.hidden, self.routed_inter = num_layers, hidden, routed_inter

    def __call__(self, expert: Expert, ckpt, is_shared: bool):
        from moeforge.families import family_of

        parts = getattr(ckpt, "parts", None) or [((0, self.num_layers), ckpt)]
        for _, part in parts:
            other = family_of(part)
            if other.name not in self.families and not self.opts.allow_crimes:
                raise SourceError(
                    f"{part.label}: is a {other.name} model but {self.family_rule}; mixing families needs --allow-crimes"
                )
            for key, want in (("hidden_size", self.hidden), ("num_hidden_layers", self.num_layers)):
                got = part.config_value(key)
                if got != want:
                    raise SourceError(f"{part.label}: {key} is {got}, but {self.whose} is {want}")
        mlp = family_of(ckpt).mlp_name
        inter = ckpt.ref(mlp("gate", 0)).shape[0]
        for layer in range(self.num_layers):
            shapes = {r: ckpt.ref(mlp(r, layer)).shape for r in ("gate", "up", "down")}
            want = {"gate": (inter, self.hidden), "up": (inter, self.hidden), "down": (self.hidden, inter)}
            if shapes != want:
                raise SourceError(
                    f"{expert.label}: layer {layer} MLP shapes {shapes} do not match {want} "
                    f"(hidden size {self.hidden}, intermediate size {inter})"
                )
        if self.routed_inter is None:
            self.routed_inter = inter
        elif inter != self.routed_inter and (not is_shared or self.layout.shared_width_is_routed):
            kind = "shared expert" if is_shared else "expert"
            raise SourceError(
                f"{expert.label}: {kind} intermediate size {inter} differs from the routed experts' "
                f"{self.routed_inter} ({self.layout.name} needs them equal)"
            )
        return ckpt


def _output_dtype(config: MoEConfig, base: Checkpoint) -> str:
    name = config.dtype or base.config_value("torch_dtype") or base.config_value("dtype")
    if isinstance(name, str) and name in CODE_OF and CODE_OF[name] in ("F32", "F16", "BF16"):
        return CODE_OF[name]
    return base.ref(next(iter(base.tensors))).dtype
