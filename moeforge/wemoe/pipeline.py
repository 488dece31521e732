"""`moeforge wemoe CONFIG OUT`: config -> sources and data -> WE-MoE model -> test-time adaptation -> OUT."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Union

from moeforge.wemoe.config import WEMoEConfig, load_wemoe_config

log = logging.getLogger("moeforge")


@dataclasses.dataclass
class WEMoEOptions:
    """The CLI flags, also keyword arguments of `moeforge.wemoe.run`."""

    max_steps: Optional[int] = None  # overrides tta.max_steps
    seed: Optional[int] = None  # overrides seed
    checkpoint_every: Optional[int] = None  # overrides tta.checkpoint_every
    checkpoint_dir: Optional[str] = None  # default: <OUT>.wemoe-checkpoint beside OUT
    resume: bool = False
    device: str = "auto"  # auto, cpu or cuda (under `accelerate launch`, accelerate decides)
    overwrite: bool = False
    quiet: bool = False
    verbose: bool = False


@dataclasses.dataclass
class WEMoEResult:
    out_dir: Path
    steps: int
    loss_first: Optional[float]
    loss_last: Optional[float]
    params: dict
    model: object = dataclasses.field(default=None, repr=False)  # the adapted WEMoEModel (on its device)
    is_main_process: bool = True  # under `accelerate launch`, only the main process writes OUT

    def summary(self) -> str:
        loss = (f"entropy {self.loss_first:.4f} -> {self.loss_last:.4f}" if self.loss_first is not None
                else "no adaptation steps")
        p = self.params
        return (f"wrote {self.out_dir}: routers adapted for {self.steps} steps ({loss}); "
                f"{p['trainable']:,} trainable of {p['total']:,} parameters ({p['trainable_percent']}%)")


def apply_overrides(config: WEMoEConfig, opts: WEMoEOptions) -> WEMoEConfig:
    data = config.model_dump()
    if opts.seed is not None:
        data["seed"] = opts.seed
    if opts.max_steps is not None:
        data["tta"]["max_steps"] = opts.max_steps
    if opts.checkpoint_every is not None:
        data["tta"]["checkpoint_every"] = opts.checkpoint_every
    return WEMoEConfig.from_dict(data, origin="command line")


def default_checkpoint_dir(out: Path) -> Path:
    return out.absolute().parent / f"{out.name}.wemoe-checkpoint"


def make_accelerator(device: str):
    from accelerate import Accelerator

    from moeforge.errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not one of auto, cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda requested but no CUDA device is available")
    return Accelerator(cpu=device == "cpu")


def check(config_or_path: Union[WEMoEConfig, dict, str, Path]) -> dict:
    """What `run` checks before it builds anything, without building: the config, every task's data, and every
    source's type (config.json and headers only). Returns the number of inputs of each task."""
    from moeforge.wemoe.families import family_named
    from moeforge.wemoe.model import open_sources

    config = load_wemoe_config(config_or_path)
    family = family_named(config.family)
    data = task_data(config, family)
    open_sources(config, family).close()
    return {name: len(items) for name, items in data.items()}


def task_data(config: WEMoEConfig, family) -> dict:
    """Each task's inputs by task name; a missing or unreadable data set is a one-line ConfigError."""
    from moeforge.wemoe.data import load_task_data

    return {t.name: load_task_data(t, family.data_kind, f"experts.{i}.data") for i, t in enumerate(config.experts)}


def run(config_or_path: Union[WEMoEConfig, dict, str, Path], out_dir: Union[str, Path], **options) -> WEMoEResult:
    """Merge, adapt the routers at test time and write OUT (see WEMoEOptions for the keyword options)."""
    from moeforge.wemoe.families import family_named
    from moeforge.writer.output_dir import atomic_output_dir, check_output_path

    opts = WEMoEOptions(**options)
    config = apply_overrides(load_wemoe_config(config_or_path), opts)
    out = Path(out_dir)
    check_output_path(out, opts.overwrite)
    family = family_named(config.family)
    data = task_data(config, family)
    accelerator = make_accelerator(opts.device)  # bad input is reported above, before torch is imported
    from moeforge.wemoe.export import sources_record, write_output
    from moeforge.wemoe.model import build_wemoe_model, open_sources
    from moeforge.wemoe.tta import Checkpointer, adapt, fingerprint

    sources = open_sources(config, family)
    try:
        record = sources_record(config, sources)
        checkpointer = Checkpointer(Path(opts.checkpoint_dir) if opts.checkpoint_dir else default_checkpoint_dir(out),
                                    fingerprint(config, record))
        started = time.monotonic()
        model = build_wemoe_model(config, family, sources).attach_runtime(str(sources.base.path))
        model.to_device(accelerator.device)
        log.info("built %s WEMoE %s; adapting on %d process(es), device %s", config.family, model.param_counts(),
                 accelerator.num_processes, accelerator.device)
        result = adapt(model, data, config, accelerator, checkpointer, resume=opts.resume, quiet=opts.quiet)
        summary = result.summary()
        if accelerator.is_main_process:
            with atomic_output_dir(out, opts.overwrite) as tmp:
                write_output(tmp, model, config, record, summary, time.monotonic() - started)
            checkpointer.remove()
        accelerator.wait_for_everyone()
        return WEMoEResult(out, result.steps, summary.get("loss_first"), summary.get("loss_last"),
                           model.param_counts(), model, accelerator.is_main_process)
    finally:
        sources.close()
