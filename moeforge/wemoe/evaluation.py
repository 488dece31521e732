"""`moeforge wemoe eval OUT`: per-task accuracy of the adapted WEMoE model beside the pretrained model, each
fine-tuned model on its own task, and task arithmetic (clip-vision: classification accuracy against the
zero-shot heads; causal-lm: next-token top-1 accuracy on the texts)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Union

from moeforge.errors import ConfigError


@dataclasses.dataclass
class EvalReport:
    tasks: List[str]
    rows: Dict[str, Dict[str, float]]  # method -> task -> accuracy (%)
    counts: Dict[str, int]  # task -> number of predictions scored

    def mean(self, method: str) -> float:
        vals = [self.rows[method][t] for t in self.tasks]
        return sum(vals) / len(vals)

    def table(self) -> str:
        head = "| method | " + " | ".join(self.tasks) + " | mean |"
        sep = "| --- |" + " ---: |" * (len(self.tasks) + 1)
        lines = [head, sep]
        for method, accs in self.rows.items():
            cells = [f"{accs[t]:.1f}" for t in self.tasks]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {self.mean(method):.1f} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "accuracy": self.rows, "mean": {m: self.mean(m) for m in self.rows},
                "scored": self.counts}


METHODS = ("pretrained", "fine-tuned (own task)", "task arithmetic", "WEMoE")


def accuracy(logits_fn, runtime, data, batch_size: int, limit: Optional[int], device) -> tuple:
    import torch

    from moeforge.wemoe.data import sequential_batches

    right = total = 0
    with torch.no_grad():
        for batch in sequential_batches(data, runtime.collate, batch_size, limit):
            batch = {k: v.to(device) for k, v in batch.items()}
            r, n = runtime.correct(logits_fn(batch), batch)
            right, total = right + r, total + n
    return 100.0 * right / max(total, 1), total


def evaluate(out_dir: Union[str, Path], data: Optional[Dict[str, str]] = None, batch_size: int = 64,
             device: str = "auto", limit: Optional[int] = None, verify: bool = True,
             methods=METHODS) -> EvalReport:
    """Score every method on every task's labelled data (the config's `data`, or `data[name]`)."""
    from moeforge.wemoe.data import load_task_data
    from moeforge.wemoe.export import load
    model = load(out_dir, device=device, verify=verify)
    from moeforge.wemoe.model import static_model

    config, family, runtime = model.config, model.family, model.runtime
    dev = next(model.hf.parameters()).device
    unknown = sorted(set(data or {}) - set(config.task_names))
    if unknown:
        raise ConfigError(f"--data: no task named {unknown[0]!r} (tasks: {', '.join(config.task_names)})")
    sets = {}
    for task in config.experts:
        where = f"--data {task.name}" if data and task.name in data else f"{task.name} data"
        d = load_task_data(task, family.data_kind, where, (data or {}).get(task.name))
        if family.data_kind == "images" and d.labels is None:
            raise ConfigError(f"{where}: has no labels; accuracy needs labelled data")
        sets[task.name] = d
    n = len(config.experts)
    rows: Dict[str, Dict[str, float]] = {}
    counts: Dict[str, int] = {}

    def score_static(label: str, coeffs_for) -> None:
        rows[label] = {}
        cache = {}
        for i, name in enumerate(config.task_names):
            coeffs = tuple(coeffs_for(i))
            if coeffs not in cache:
                cache.clear()  # one static model in memory at a time
                cache[coeffs] = static_model(family, model.sources, coeffs, dev)
            plain = cache[coeffs]
            rows[label][name], counts[name] = accuracy(lambda b: runtime.logits(plain, name, b), runtime, sets[name],
                                                       batch_size, limit, dev)

    for method in methods:
        if method == "pretrained":
            score_static(method, lambda i: [0.0] * n)
        elif method == "fine-tuned (own task)":
            score_static(method, lambda i: [1.0 if j == i else 0.0 for j in range(n)])
        elif method == "task arithmetic":
            score_static(method, lambda i: [config.init_lambda] * n)
        elif method == "WEMoE":
            rows[method] = {}
            for name in config.task_names:
                rows[method][name], counts[name] = accuracy(lambda b: model.task_logits(name, b), runtime, sets[name],
                                                            batch_size, limit, dev)
        else:
            raise ConfigError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    return EvalReport(config.task_names, rows, counts)
