"""`moeforge build`: config -> sources -> checks -> gates -> plan -> writer -> output directory.

The orchestrator: the only module that knows every step. Nothing imports it but the commands."""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Union

from moeforge.config import MoEConfig, load_config
from moeforge.errors import ConfigError
from moeforge.gate_modes import GATE_MODES
from moeforge.options import BuildOptions, parse_shard_size
from moeforge.pipeline.inputs import Inputs, open_inputs
from moeforge.pipeline.side_files import SIDE_FILES, copied_names
from moeforge.sources.checkpoint import DTYPES
from moeforge.units import human_count as human

if TYPE_CHECKING:
    from moeforge.plan import MoEPlan
    from moeforge.plan.report import PlanReport

log = logging.getLogger("moeforge")

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


def build(config_or_path: Union[MoEConfig, dict, str, Path], out_dir: Union[str, Path], **options) -> BuildResult:
    """Build an MoE checkpoint at `out_dir`. Keyword options are the CLI flags (see `BuildOptions`)."""
    from moeforge.writer.output_dir import check_output_path
    from moeforge.writer.resume import BuildSession

    config = load_config(config_or_path, strict=options.get("strict", False))
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


def dry_run(config_or_path: Union[MoEConfig, dict, str, Path], out_dir: Union[str, Path, None] = None,
            **options) -> "PlanReport":
    """Check every source and size the build from configs and headers only: no tensor data is read, no gate
    computed, nothing written. Options are `build`'s. The report's `lines()` is what `moeforge plan` prints."""
    from moeforge.plan.report import make_report
    from moeforge.writer.output_dir import check_output_path

    config = load_config(config_or_path, strict=options.get("strict", False))
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
    if compute_routers and not GATE_MODES[inputs.config.gate_mode].overlaps_writer:
        gates.value()
    routed = gates.map((n_layers, n_routed, inputs.hidden_size), lambda x: x[:, :n_rows].repeat_interleave(g, dim=1))
    shared = gates.map((n_layers, len(gated) - n_rows, inputs.hidden_size), lambda x: x[:, n_rows:])
    plan = plan_moe(inputs, routed, shared)
    for warning in inputs.layout.warnings(plan.shape):
        log.warning("%s", warning)
    return plan


def _compute_gates(inputs: Inputs, gated, n_rows: int):
    from moeforge.gates import GateInputs, compute_gates

    return compute_gates(
        inputs.config.gate_mode,
        GateInputs(inputs.base, [e for e, _ in gated], inputs.num_layers, inputs.hidden_size, inputs.seed,
                   inputs.options, num_routed=n_rows, checkpoints=[c for _, c in gated]),
    )


def write_output(inputs: Inputs, plan: "MoEPlan", out_dir: Path, session=None) -> BuildResult:
    """Shards, the side files, then the manifest, into a partial directory that becomes `out_dir` when complete."""
    from moeforge.pipeline.output import write_checkpoint
    from moeforge.writer.resume import BuildSession

    session = session or BuildSession.open(out_dir, inputs)
    written = write_checkpoint(session, plan, shard_bytes(inputs), functools.partial(_computed_parts, inputs, plan),
                               inputs.base.path, copied_names(inputs.options.copy_tokenizer))
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
