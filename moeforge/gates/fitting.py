"""Fit a router (softmax, experts x hidden) or a shared-expert gate (sigmoid, 1 x hidden) to labelled tokens.

The model is a logistic regression without bias, because MoE routers have none:
- softmax rows: loss -log p_y for a token of expert y's positive prompts, and -log(1 - p_e) for a token of
  expert e's negative prompts (it pushes e's probability down without choosing a winner);
- sigmoid rows (each row independent): -log sigmoid(z_y) for positives, -log(1 - sigmoid(z_e)) for negatives.
Every (row, positive) and (row, negative) token group has the same total weight, so an expert with long
prompts does not outvote one with short prompts. Features are divided by one scalar per layer (their RMS)
so that the L2 strength means the same at every scale; the returned weights are in the raw feature units.
The objective is strictly convex, and full-batch L-BFGS from zero gives the same answer on every run.
"""
from __future__ import annotations

import contextlib
import dataclasses

DEFAULT_L2 = 1e-3  # on unit-RMS features, per unit of total token weight
DEFAULT_MAX_ITER = 200
SMALL_PROBLEM = 1 << 22  # multiply-adds per evaluation under which one thread is faster than a thread pool


@dataclasses.dataclass
class FitResult:
    weight: "object"  # torch.Tensor (rows, hidden), float32
    loss: float
    iterations: int


def fit_gate(
    x,
    positive,
    negative=None,
    *,
    rows: int,
    kind: str = "softmax",
    l2: float = DEFAULT_L2,
    max_iter: int = DEFAULT_MAX_ITER,
) -> FitResult:
    """x: (tokens, hidden). positive[i]: the row token i should score highest on (softmax) or open (sigmoid),
    or -1. negative[i]: the row token i should score low on, or -1. A token may carry both or either."""
    import torch

    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be softmax or sigmoid, not {kind!r}")
    x = x.float()
    positive = torch.as_tensor(positive, dtype=torch.long)
    negative = torch.full_like(positive, -1) if negative is None else torch.as_tensor(negative, dtype=torch.long)
    if x.shape[0] != positive.shape[0] or positive.shape != negative.shape:
        raise ValueError("x, positive and negative must describe the same tokens")
    if kind == "softmax" and rows < 2:
        raise ValueError("a softmax router needs at least two rows")

    w_pos = _group_weights(positive, rows)
    w_neg = _group_weights(negative, rows)
    total = float(w_pos.sum() + w_neg.sum())
    if total == 0:
        return FitResult(torch.zeros(rows, x.shape[1]), 0.0, 0)
    w_pos, w_neg = w_pos / total, w_neg / total
    scale = x.pow(2).mean().sqrt().clamp(min=1e-12)
    xs = x / scale
    pos_idx, neg_idx = positive.clamp(min=0), negative.clamp(min=0)
    has_pos, has_neg = positive >= 0, negative >= 0

    weight = torch.zeros(rows, x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def objective():
        z = (xs @ weight.t()).double()
        if kind == "softmax":
            log_norm = torch.logsumexp(z, dim=1)
            pos_loss = log_norm - z.gather(1, pos_idx[:, None])[:, 0]
            others = z.scatter(1, neg_idx[:, None], float("-inf"))
            neg_loss = log_norm - torch.logsumexp(others, dim=1)  # -log(1 - p_e)
        else:
            pos_loss = torch.nn.functional.softplus(-z.gather(1, pos_idx[:, None])[:, 0])
            neg_loss = torch.nn.functional.softplus(z.gather(1, neg_idx[:, None])[:, 0])
        data = (w_pos * torch.where(has_pos, pos_loss, 0.0)).sum() + (w_neg * torch.where(has_neg, neg_loss, 0.0)).sum()
        return data + 0.5 * l2 * weight.double().pow(2).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    threads = _one_thread() if xs.numel() * rows < SMALL_PROBLEM else contextlib.nullcontext()
    with torch.enable_grad(), threads:
        opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    iterations = opt.state[weight].get("n_iter", 0)
    return FitResult((weight.detach() / scale).contiguous(), final, int(iterations))


@contextlib.contextmanager
def _one_thread():
    """Tiny fits spend their time in thread-pool handoffs, badly so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _group_weights(labels, rows: int):
    """Per-token weight: each row's tokens share one unit of weight."""
    import torch

    valid = labels >= 0
    counts = torch.bincount(labels[valid], minlength=rows).double()
    weights = torch.zeros(labels.shape[0], dtype=torch.float64)
    weights[valid] = 1.0 / counts[labels[valid]]
    return weights
