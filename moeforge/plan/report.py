"""What a build would write and need, from the plan alone: `moeforge plan` and `moeforge build --dry-run`.

Nothing here reads tensor data or computes a gate; sizes come from the headers, memory is an estimate.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from moeforge.checks import disk
from moeforge.errors import MoeforgeError
from moeforge.plan.tensors import FromSource, FromValue
from moeforge.files import GENERATION_CONFIG, TOKENIZER_FILES
from moeforge.gate_modes import GATE_MODES
from moeforge.sources.checkpoint import DTYPES
from moeforge.units import human_bytes, human_count as human

if TYPE_CHECKING:
    from moeforge.pipeline.inputs import Inputs
    from moeforge.plan import MoEPlan

# Peak RSS of a bf16 -> bf16 random-gate build (Python, torch, safetensors, transformers imported, and the
# sha256 threads' memory-map windows), measured at 0.32-0.38 GiB with torch 2.13 CPU and transformers 5
# (README, "Benchmarks"), plus some margin.
RUNTIME_BYTES = 400 * 2**20
TOKENIZER_BYTES = 100 * 2**20  # transformers' tokenizer and prompt batches (prompt gate modes)
SIDE_FILE_SLACK = 1 * 2**20  # config.json, moeforge_config.yml, the index


@dataclasses.dataclass
class ShardSummary:
    name: str
    nbytes: int
    tensors: int


@dataclasses.dataclass
class PlanReport:
    layout: str
    num_experts: int
    experts_per_token: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    gate_mode: str
    sources: List[str]
    total_params: int
    active_params: int
    shards: List[ShardSummary]
    copied_bytes: int  # moved file to file, never decoded
    converted_bytes: int  # decoded and re-encoded in row chunks (dtype change, residual_scale, noise)
    computed_bytes: int  # routers and other computed tensors
    side_bytes: int  # tokenizer and other files copied beside the shards
    memory: Dict[str, int]  # estimated peak RSS by part
    disk_path: Path
    disk_free: Optional[int]  # None when the filesystem does not say

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards) + self.side_bytes + SIDE_FILE_SLACK

    @property
    def peak_memory(self) -> int:
        return sum(self.memory.values())

    @property
    def disk_ok(self) -> bool:
        return self.disk_free is None or self.disk_free >= self.output_bytes

    @property
    def _gates_when(self) -> str:
        if GATE_MODES[self.gate_mode].overlaps_writer:
            return "while the unchanged bytes are copied"
        return "before the shards are written; the base model is freed first"

    def lines(self) -> List[str]:
        width = max(len(s.name) for s in self.shards)
        shard_lines = [f"{s.name:<{width}}  {human_bytes(s.nbytes):>9}  {s.tensors} tensors" for s in self.shards]
        memory = " + ".join(f"{k} {human_bytes(v)}" for k, v in self.memory.items() if v)
        free = human_bytes(self.disk_free) if self.disk_free is not None else "unknown"
        rows: List[Tuple[str, str]] = [
            ("sources", f"{len(self.sources)} model(s), checked from configs and headers: {', '.join(self.sources)}"),
            ("layout", f"{self.layout}: {self.num_experts} experts, top-{self.experts_per_token}, {self.num_layers} "
                       f"layers, hidden {self.hidden_size}, intermediate {self.intermediate_size}, {DTYPES[self.dtype][0]}"),
            ("gates", f"{self.gate_mode} (computed {self._gates_when})"),
            ("parameters", f"{human(self.total_params)} total, {human(self.active_params)} active per token"),
            ("shards", shard_lines[0]),
            *(("", line) for line in shard_lines[1:]),
            ("bytes", f"{human_bytes(self.copied_bytes)} copied unchanged, {human_bytes(self.converted_bytes)} "
                      f"converted, {human_bytes(self.computed_bytes)} computed"),
            ("peak memory", f"~{human_bytes(self.peak_memory)} estimated ({memory})"),
            ("disk", f"{human_bytes(self.output_bytes)} needed, {free} free at {self.disk_path}"
                     + ("" if self.disk_ok else "  NOT ENOUGH")),
        ]
        return [f"{k:<12} {v}" for k, v in rows]


def make_report(inputs: "Inputs", plan: "MoEPlan", out_dir: Optional[Path], shard_bytes: int) -> PlanReport:
    from moeforge.writer.safetensors_stream import data_order, encode_header, shard_names, split_shards

    groups = split_shards(plan.tensors, shard_bytes)
    shards = [  # the header as written: in data order, whose offsets may need more digits
        ShardSummary(name, len(encode_header(data_order(g))) + sum(t.nbytes for t in g), len(g))
        for name, g in zip(shard_names(len(groups)), groups)
    ]
    copied = sum(t.nbytes for t in plan.tensors if t.raw_parts() is not None)
    computed = sum(t.nbytes for t in plan.tensors if isinstance(t.source, FromValue))
    converted = plan.nbytes - copied - computed
    side = _side_bytes(inputs)
    disk_path = disk.existing_parent(Path(out_dir) if out_dir is not None else Path.cwd() / "out")
    return PlanReport(
        layout=inputs.layout.name, num_experts=len(inputs.experts), experts_per_token=inputs.config.experts_per_token,
        num_layers=inputs.num_layers, hidden_size=inputs.hidden_size, intermediate_size=plan.shape.intermediate_size,
        dtype=inputs.out_dtype, gate_mode=inputs.config.gate_mode, sources=[c.label for c in inputs.checkpoints.values()],
        total_params=plan.total_params, active_params=plan.active_params, shards=shards, copied_bytes=copied,
        converted_bytes=converted, computed_bytes=computed, side_bytes=side, memory=estimate_memory(inputs, plan),
        disk_path=disk_path, disk_free=disk.free_bytes(disk_path),
    )


def estimate_memory(inputs: "Inputs", plan: "MoEPlan") -> Dict[str, int]:
    """Peak RSS by part: the runtime, the largest conversion working set, and what the gate mode loads."""
    from moeforge.writer.safetensors_stream import CHUNK_BYTES

    working = 0
    for t in plan.tensors:
        src = t.source
        if t.raw_parts() is not None or not isinstance(src, FromSource):
            continue
        src_bytes, out_bytes = DTYPES[src.ref.dtype][1], DTYPES[t.dtype][1]
        if src.noise_scale:  # whole tensor in float32: source, noise, sum, cast
            need = t.numel * (src_bytes + 3 * 4 + out_bytes)
        else:  # one row chunk: read, scaled copy, cast (as the writer sizes its chunks)
            rows = t.shape[0] if t.shape else 1
            step = max(1, CHUNK_BYTES // max(1, t.nbytes // max(rows, 1) * 4))
            need = min(rows, step) * (t.numel // max(rows, 1)) * (2 * src_bytes + out_bytes)
        working = max(working, need)
    gates = plan.num_layers * len(inputs.experts) * inputs.hidden_size * 4
    mode = GATE_MODES[inputs.config.gate_mode]
    runs_base = mode.runs_base_model
    if runs_base:
        bytes_per = DTYPES[{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[inputs.options.hidden_dtype]][1]
        base_params = sum(ref.nbytes // DTYPES[ref.dtype][1] for ref in inputs.base.tensors.values())
        gates += base_params * bytes_per + TOKENIZER_BYTES
    elif mode.needs_prompts:
        gates += TOKENIZER_BYTES
    return {"runtime": RUNTIME_BYTES, "conversion": working,
            ("base model forward" if runs_base else "gates"): gates}


def _side_bytes(inputs: "Inputs") -> int:

    names = [GENERATION_CONFIG] + (list(TOKENIZER_FILES) if inputs.options.copy_tokenizer else [])
    return sum((inputs.base.path / n).stat().st_size for n in names if (inputs.base.path / n).is_file())


def disk_shortfall(report: PlanReport) -> Optional[str]:
    if report.disk_ok:
        return None
    return (f"{report.disk_path}: not enough free disk: the output needs {human_bytes(report.output_bytes)}, "
            f"{human_bytes(report.disk_free)} is free")


def check_disk(report: PlanReport) -> None:
    problem = disk_shortfall(report)
    if problem:
        raise MoeforgeError(problem)
