"""Assemble a WEMoE model from lazily read sources: task arithmetic outside the MLPs, WE-MoE blocks inside."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from moeforge.errors import SourceError
from moeforge.sources.checkpoint import Checkpoint
from moeforge.sources.open_model import open_checkpoint
from moeforge.wemoe.module import Router, RoutingContext, WeightEnsemblingMLP

SHARED_ROUTER = "shared_router"


@dataclasses.dataclass
class Sources:
    base: Checkpoint
    experts: List[Checkpoint]

    def close(self) -> None:
        for ckpt in [self.base, *self.experts]:
            ckpt.close()


def open_sources(config, family) -> Sources:
    """Resolve every model reference and check its type (config and headers only)."""
    base = open_checkpoint(config.base_model)
    family.check_base(base)
    experts = []
    for task in config.experts:
        ckpt = base if task.source_model == config.base_model else open_checkpoint(task.source_model)
        family.check_expert(ckpt)
        experts.append(ckpt)
    return Sources(base, experts)


def expert_tensor(family, ckpt: Checkpoint, name: str, like: torch.Tensor) -> torch.Tensor:
    src = family.source_name(ckpt, name)
    if src is None:
        raise SourceError(f"{ckpt.label}: has no tensor {name!r} (is it fine-tuned from the base model?)")
    t = ckpt.load(src)
    if tuple(t.shape) != tuple(like.shape):
        raise SourceError(f"{ckpt.label}: tensor {src!r} has shape {tuple(t.shape)}, but the base model's is "
                          f"{tuple(like.shape)}")
    return t.to(device=like.device, dtype=torch.float32)


def merge_into(model: nn.Module, family, experts: Sequence[Checkpoint], coeffs: Sequence[float],
               skip: Sequence[str] = ()) -> nn.Module:
    """theta = theta_0 + sum_i c_i (theta_i - theta_0) for every in-scope parameter not in `skip` (in place)."""
    skip = set(skip)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not family.in_scope(name) or name in skip:
                continue
            delta = torch.zeros_like(p, dtype=torch.float32)
            for c, ckpt in zip(coeffs, experts):
                if c:
                    delta += c * (expert_tensor(family, ckpt, name, p) - p.float())
            p.add_(delta.to(p.dtype))
    return model


def static_model(family, sources: Sources, coeffs: Sequence[float], device="cpu") -> nn.Module:
    """A plain model with fixed merge coefficients: task arithmetic (all lambda), one expert (one-hot), base (0)."""
    model = family.load_model(str(sources.base.path))
    merge_into(model, family, sources.experts, coeffs)
    return model.to(device).requires_grad_(False)


def sparsify(tv: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude (1 - sparsity) share of each task's entries (E-WEMoE's tv_prune_ratio)."""
    flat = tv.reshape(tv.shape[0], -1)
    keep = int(round(flat.shape[1] * (1.0 - sparsity)))
    out = torch.zeros_like(flat)
    if keep > 0:
        idx = flat.abs().topk(keep, dim=1).indices
        out.scatter_(1, idx, flat.gather(1, idx))
    return out.view_as(tv)


class WEMoEModel(nn.Module):
    """A transformers model whose routed MLPs are WE-MoE blocks, plus the task heads of its family."""

    def __init__(self, hf: nn.Module, family, config, blocks_prefix: str, moe: List[WeightEnsemblingMLP],
                 context: RoutingContext, shared_router: Optional[Router]):
        super().__init__()
        self.hf = hf
        self.family = family
        self.config = config
        self.blocks_prefix = blocks_prefix
        self.moe = moe  # plain list: the blocks are registered inside hf already
        self.context = context
        self.shared_router = shared_router
        self.runtime = None  # set by attach_runtime (heads, tokenizer, processor)
        self.sources: Optional[Sources] = None  # the checkpoints it was built from (for static comparisons)

    @property
    def task_names(self) -> List[str]:
        return self.config.task_names

    @property
    def batch_reduce(self) -> bool:
        return self.context.batch_reduce

    @batch_reduce.setter
    def batch_reduce(self, value: bool) -> None:
        self.context.batch_reduce = value

    def attach_runtime(self, base_path: str) -> "WEMoEModel":
        self.runtime = self.family.runtime(self.hf, base_path, self.config)
        return self

    def to_device(self, device) -> "WEMoEModel":
        self.to(device)
        if self.runtime is not None:
            self.runtime.to(device)
        return self

    # ---- routers --------------------------------------------------------------------------------
    def named_routers(self) -> Dict[str, Router]:
        if self.shared_router is not None:
            return {SHARED_ROUTER: self.shared_router}
        return {f"{self.blocks_prefix}.{i}.mlp.router": block.router for i, block in enumerate(self.moe)}

    def router_parameters(self) -> List[nn.Parameter]:
        return [p for r in self.named_routers().values() for p in r.parameters()]

    def router_tensors(self) -> Dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": p.detach().float().cpu().clone()
                for prefix, r in self.named_routers().items() for name, p in r.named_parameters()}

    def load_router_tensors(self, tensors: Dict[str, torch.Tensor], origin: str = "routers") -> None:
        want = {k: v.shape for k, v in self.router_tensors().items()}
        if set(tensors) != set(want):
            missing = sorted(set(want) - set(tensors))
            extra = sorted(set(tensors) - set(want))
            raise SourceError(f"{origin}: router tensors do not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
        with torch.no_grad():
            for prefix, r in self.named_routers().items():
                for name, p in r.named_parameters():
                    t = tensors[f"{prefix}.{name}"]
                    if t.shape != p.shape:
                        raise SourceError(f"{origin}: {prefix}.{name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                    p.copy_(t.to(p.dtype))

    # ---- forward --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tokens(self, batch: dict):
        self.context.token_mask = self.runtime.token_mask(batch)
        try:
            yield
        finally:
            self.context.token_mask = None

    def task_logits(self, task: str, batch: dict) -> torch.Tensor:
        """2-D logits whose entropy is the TTA loss: (samples, classes) or (real tokens, vocab)."""
        with self._tokens(batch):
            return self.runtime.logits(self.hf, task, batch)

    # ---- size -----------------------------------------------------------------------------------
    def param_counts(self) -> Dict[str, float]:
        """As in the WEMoE/E-WEMoE tables: trainable = routers; total = one dense model (merged non-MLP
        weights + base MLPs) + stored task-vector entries (non-zero ones when sparse) + routers."""
        router_ids = {id(p) for p in self.router_parameters()}
        seen, dense = set(), 0
        for module in self.family.scope_modules(self.hf):
            for p in module.parameters():
                if id(p) not in seen and id(p) not in router_ids:
                    seen.add(id(p))
                    dense += p.numel()
        sparse = self.config.sparsity is not None
        tvs = 0
        for block in self.moe:
            for name in block._tv_names:
                tv = block.task_vector(name)
                tvs += int(torch.count_nonzero(tv)) if sparse and not tv.is_meta else tv.numel()
        routers = sum(p.numel() for p in self.router_parameters())
        total = dense + tvs + routers
        return {
            "trainable": routers, "total": total, "dense_model": dense, "task_vectors": tvs,
            "trainable_percent": round(100.0 * routers / total, 4) if total else 0.0,
        }


def build_wemoe_model(config, family, sources: Sources, device="cpu") -> WEMoEModel:
    """Task arithmetic for all in-scope non-MLP weights; each block's MLP becomes a WE-MoE block."""
    hf = family.load_model(str(sources.base.path))
    prefix, blocks = family.blocks(hf)
    mlp_names = {f"{prefix}.{i}.mlp.{n}" for i, b in enumerate(blocks) for n, _ in b.mlp.named_parameters()}
    n = len(config.experts)
    merge_into(hf, family, sources.experts, [config.init_lambda] * n, skip=mlp_names)
    task_vectors = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            tvs = {}
            for name, p in block.mlp.named_parameters():
                full = f"{prefix}.{i}.mlp.{name}"
                tv = torch.stack([expert_tensor(family, c, full, p) - p.float() for c in sources.experts])
                tvs[name] = sparsify(tv, config.sparsity) if config.sparsity is not None else tv
            task_vectors.append(tvs)
    model = assemble(hf, family, config, task_vectors)
    model.sources = sources
    return model.to_device(device)


def assemble(hf: nn.Module, family, config, task_vectors: List[Dict[str, torch.Tensor]]) -> WEMoEModel:
    """Swap each block's MLP for a WE-MoE block over its task vectors; freeze everything but the routers."""
    prefix, blocks = family.blocks(hf)
    hidden = family.hidden_size(hf)
    n = len(config.experts)
    device = next(hf.parameters()).device
    gen = torch.Generator().manual_seed(config.seed)
    hf.requires_grad_(False)

    def new_router() -> Router:
        return Router(hidden, n, config.router_hidden_layers, config.init_lambda, config.router_init_std, gen, device)

    shared = new_router() if config.uses_shared_router else None
    context = RoutingContext(batch_reduce=config.batch_reduce)
    moe = []
    for block, tvs in zip(blocks, task_vectors):
        we = WeightEnsemblingMLP(block.mlp, tvs, shared if shared is not None else new_router(), context)
        block.mlp = we
        moe.append(we)
    model = WEMoEModel(hf, family, config, prefix, moe, context, shared)
    for p in model.router_parameters():
        p.requires_grad_(True)
    return model
