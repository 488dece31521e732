"""The weight-ensembling MoE block: a router picks how much of each task vector to add to the base MLP.

The merged MLP weights are computed per forward pass and applied with a functional call, so N full
models are never materialised; only the base MLP and the stacked MLP task vectors are held.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call


class RoutingContext:
    """State shared by every WE-MoE block of one model: batch reduction and which tokens are real."""

    def __init__(self, batch_reduce: bool = True):
        self.batch_reduce = batch_reduce
        self.token_mask: Optional[torch.Tensor] = None  # (batch, tokens), 1 for real tokens
        self.record: Optional[list] = None  # when a list, every block appends its (batch, tasks) weights


class Router(nn.Module):
    """Maps hidden states to one unnormalised weight per task (no softmax), as in WEMoE.

    depth 0: a learned vector (input-independent); 1: Linear(H, N); 2: Linear(H, H), ReLU, Linear(H, N).
    Output biases start at init_lambda and weights at N(0, std^2), so the step-0 model is task arithmetic.
    """

    def __init__(self, hidden_size: int, num_tasks: int, depth: int, init_lambda: float, init_std: float,
                 generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        self.depth = depth
        self.num_tasks = num_tasks
        if depth == 0:
            self.bias = nn.Parameter(torch.full((num_tasks,), float(init_lambda), device=device))
            return
        if depth == 2:
            self.hidden = nn.Linear(hidden_size, hidden_size, device=device)
            _init_linear(self.hidden, 0.0, init_std, generator)
        self.out = nn.Linear(hidden_size, num_tasks, device=device)
        _init_linear(self.out, init_lambda, init_std, generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.bias.expand(*h.shape[:-1], self.num_tasks)
        if self.depth == 2:
            h = torch.relu(self.hidden(h))
        return self.out(h)


def _init_linear(layer: nn.Linear, bias: float, std: float, generator) -> None:
    with torch.no_grad():
        if layer.weight.is_meta:
            return
        if std > 0:
            noise = torch.randn(layer.weight.shape, generator=generator) * std
            layer.weight.copy_(noise)
        else:
            layer.weight.zero_()
        layer.bias.fill_(bias)


class WeightEnsemblingMLP(nn.Module):
    """Drop-in replacement for a transformer block's MLP: W = W_0 + sum_i r_i * tau_i, r from the router."""

    def __init__(self, base: nn.Module, task_vectors: Dict[str, torch.Tensor], router: Router,
                 context: RoutingContext):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.router = router
        self.context = context
        self._tv_names = {}
        for name, tv in task_vectors.items():
            buffer = "tv__" + name.replace(".", "__")
            self.register_buffer(buffer, tv, persistent=False)
            self._tv_names[name] = buffer

    def task_vector(self, name: str) -> torch.Tensor:
        return getattr(self, self._tv_names[name])

    def routing_weights(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, tasks): router output averaged over each sample's real tokens."""
        r = self.router(h.to(self._router_dtype()))
        mask = self.context.token_mask
        if mask is not None and tuple(mask.shape) == tuple(r.shape[:2]):
            m = mask.to(r.dtype).unsqueeze(-1)
            return (r * m).sum(1) / m.sum(1).clamp(min=1.0)
        return r.mean(1)

    def _router_dtype(self):
        for p in self.router.parameters():
            return p.dtype
        return torch.float32

    def merged_parameters(self, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Base MLP parameters plus the task vectors weighted by `weights` (tasks,)."""
        out = {}
        for name, base in self.base.named_parameters():
            tv = self.task_vector(name)
            out[name] = base + torch.tensordot(weights.to(tv.dtype), tv, dims=1)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        squeeze = hidden_states.dim() == 2
        h = hidden_states.unsqueeze(0) if squeeze else hidden_states
        weights = self.routing_weights(h)
        if self.context.record is not None:
            self.context.record.append(weights.detach())
        if self.context.batch_reduce:
            out = functional_call(self.base, self.merged_parameters(weights.mean(0)), (h,))
        else:  # sample-wise routing: one merged MLP per sample
            out = torch.cat([
                functional_call(self.base, self.merged_parameters(weights[b]), (h[b:b + 1],))
                for b in range(h.shape[0])
            ])
        return out.squeeze(0) if squeeze else out
