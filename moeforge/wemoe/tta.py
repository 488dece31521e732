"""Test-time adaptation: only the routers train, minimising the entropy of each task's predictions on its
unlabeled inputs. Runs under accelerate (CPU, one GPU, or `accelerate launch` over several processes);
checkpoints (safetensors + JSON, no pickles) every K steps make a run resumable with identical results."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from moeforge.errors import ConfigError
from moeforge.wemoe.data import step_loader

log = logging.getLogger("moeforge")
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over rows."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclasses.dataclass
class TTAResult:
    losses: List[float]  # per step: entropy summed over tasks (averaged over processes)
    steps: int
    resumed_from: int = 0
    step_seconds: List[float] = dataclasses.field(default_factory=list)  # this run's steps only

    def summary(self, points: int = 50) -> dict:
        if not self.losses:
            return {"steps": self.steps, "resumed_from": self.resumed_from}
        n = len(self.losses)
        tail = self.losses[-max(1, n // 10):]
        stride = max(1, -(-n // points))
        curve = [[i + 1, round(self.losses[i], 6)] for i in range(0, n, stride)]
        if curve[-1][0] != n:
            curve.append([n, round(self.losses[-1], 6)])
        timed = sorted(self.step_seconds[1:] or self.step_seconds)  # the first step warms up
        return {
            "steps": self.steps, "resumed_from": self.resumed_from,
            "seconds_per_step_median": round(timed[len(timed) // 2], 5) if timed else None,
            "loss_first": self.losses[0], "loss_last": self.losses[-1], "loss_min": min(self.losses),
            "loss_last_10pct_mean": sum(tail) / len(tail), "curve": curve,
        }


class Checkpointer:
    """Router and optimizer state every K steps, in a directory beside the output, written atomically."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def save(self, step: int, model, optimizer, losses: List[float]) -> None:
        from safetensors.torch import save_file

        tensors = {f"router.{k}": v for k, v in model.router_tensors().items()}
        opt_state = optimizer.state_dict()
        scalars: Dict[str, dict] = {}
        for idx, state in opt_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta = {"step": step, "fingerprint": self.fingerprint, "losses": losses,
                "param_groups": opt_state["param_groups"], "optimizer_scalars": scalars}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp_t, tmp_j = self.dir / (STATE_TENSORS + ".tmp"), self.dir / (STATE_JSON + ".tmp")
        save_file(tensors, str(tmp_t))
        tmp_j.write_text(json.dumps(meta))
        os.replace(tmp_t, self.dir / STATE_TENSORS)  # tensors first: a JSON always describes its tensors' step
        os.replace(tmp_j, self.dir / STATE_JSON)

    def exists(self) -> bool:
        return (self.dir / STATE_JSON).is_file() and (self.dir / STATE_TENSORS).is_file()

    def load(self, model, optimizer) -> tuple:
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.dir / STATE_JSON).read_text())
            tensors = load_file(str(self.dir / STATE_TENSORS))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume: {self.dir}: unreadable checkpoint ({e})") from None
        if meta.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"--resume: {self.dir}: checkpoint is from a different config or different sources")
        model.load_router_tensors({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")},
                                  origin=str(self.dir))
        device = model.router_parameters()[0].device
        state: Dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
        for idx, values in meta.get("optimizer_scalars", {}).items():
            state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return int(meta["step"]), list(meta["losses"])

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def fingerprint(config, sources_record: dict) -> str:
    """What must match for a checkpoint to be resumed: the config (but max_steps and checkpoint cadence) and sources."""
    cfg = config.model_dump()
    for key in ("max_steps", "checkpoint_every", "num_workers"):
        cfg["tta"].pop(key, None)
    blob = json.dumps({"config": cfg, "sources": sources_record}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def adapt(model, task_data: dict, config, accelerator, checkpointer: Optional[Checkpointer] = None,
          resume: bool = False, quiet: bool = False) -> TTAResult:
    """Adam on the router parameters only; each step draws one batch per task."""
    from tqdm.auto import tqdm

    tta = config.tta
    params = model.router_parameters()
    optimizer = torch.optim.Adam(params, lr=tta.lr)
    start, losses = 0, []
    if resume:
        if checkpointer is None or not checkpointer.exists():
            where = checkpointer.dir if checkpointer is not None else "the checkpoint directory"
            raise ConfigError(f"--resume: no checkpoint in {where}")
        start, losses = checkpointer.load(model, optimizer)
        log.info("resuming from step %d", start)
    if start > tta.max_steps:
        raise ConfigError(f"--max-steps: {tta.max_steps} is fewer than the {start} steps already done")
    rank, world = accelerator.process_index, accelerator.num_processes
    loaders = {
        name: step_loader(data, model.runtime.collate, tta.batch_size, start, config.seed, rank, world, tta.num_workers)
        for name, data in task_data.items()
    }
    bar = tqdm(range(start, tta.max_steps), initial=start, total=tta.max_steps, desc="test-time adaptation",
               disable=quiet or not accelerator.is_main_process, dynamic_ncols=True)
    step_seconds = []
    for step in bar:
        tick = time.perf_counter()
        total = torch.zeros((), device=accelerator.device)
        pending = None
        for name in model.task_names:
            batch = {k: v.to(accelerator.device) for k, v in next(loaders[name]).items()}
            loss = entropy_loss(model.task_logits(name, batch))
            total += loss.detach()
            if tta.grad_accumulate:
                loss.backward()  # frees this task's graph before the next task runs
            else:
                pending = loss if pending is None else pending + loss
        if pending is not None:
            pending.backward()
        if world > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            total = accelerator.reduce(total, reduction="mean")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # also waits for the device, so the step time below is real
        step_seconds.append(time.perf_counter() - tick)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if checkpointer is not None and tta.checkpoint_every and done % tta.checkpoint_every == 0 and done < tta.max_steps:
            if accelerator.is_main_process:
                checkpointer.save(done, model, optimizer, losses)
            accelerator.wait_for_everyone()
    bar.close()
    return TTAResult(losses, tta.max_steps, start, step_seconds)
