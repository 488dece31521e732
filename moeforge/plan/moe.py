"""Plan an MoE checkpoint: base tensors pass through, expert MLPs are renamed into the layout, routers added."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import List, Sequence, Tuple

from moeforge.config import Expert
from moeforge.families.base import MLP_ROLES, Family, layer_of
from moeforge.layouts.base import Layout, MoEShape
from moeforge.plan.tensors import FromSource, FromValue, PlannedTensor, output_dtype
from moeforge.sources.checkpoint import Checkpoint


@dataclasses.dataclass
class MoEPlan:
    tensors: List[PlannedTensor]
    shape: MoEShape
    num_layers: int

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active_params(self) -> int:
        """Parameters used per token: all but the routed experts not chosen."""
        routed = sum(t.numel for t in self.tensors if t.routed)
        per_expert = routed // max(self.shape.num_experts, 1)
        return self.total_params - routed + per_expert * self.shape.experts_per_token

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def noise_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so noise does not depend on write order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sort_key(name: str) -> Tuple:
    """Embeddings, then layer by layer, then the rest; numbers compare as numbers (experts.2 < experts.10)."""
    natural = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, natural)
    return (0 if "embed" in name else 2, 0, natural)


def plan_moe(
    base: Checkpoint,
    family: Family,
    layout: Layout,
    experts: Sequence[Tuple[Expert, Checkpoint]],
    routers,  # torch.Tensor (layers, experts, hidden)
    out_dtype: str,
    seed: int,
    num_layers: int,
    experts_per_token: int,
) -> MoEPlan:
    tensors: List[PlannedTensor] = []
    for name in sorted(base.tensors, key=_sort_key):
        if family.is_mlp(name) or family.is_skipped(name):
            continue
        ref = base.tensors[name]
        tensors.append(PlannedTensor(name, ref.shape, output_dtype(ref.dtype, out_dtype), FromSource(base, name)))

    for layer in range(num_layers):
        gate = routers[layer].contiguous()
        tensors.append(PlannedTensor(layout.router_name(layer), tuple(gate.shape), out_dtype, FromValue(gate)))
        for index, (expert, ckpt) in enumerate(experts):
            for role in MLP_ROLES:
                out_name = layout.expert_name(role, layer, index)
                ref = ckpt.ref(family.mlp_name(role, layer))
                source = FromSource(
                    ckpt,
                    ref.name,
                    scale=expert.residual_scale if role == "down" else None,
                    noise_scale=expert.noise_scale,
                    noise_seed=noise_seed(seed, out_name) if expert.noise_scale else None,
                )
                dtype = output_dtype(ref.dtype, out_dtype)
                tensors.append(PlannedTensor(out_name, ref.shape, dtype, source, routed=True))

    tensors.sort(key=lambda t: _sort_key(t.name))
    intermediate = experts[0][1].ref(family.mlp_name("gate", 0)).shape[0]
    return MoEPlan(tensors, MoEShape(len(experts), experts_per_token, intermediate), num_layers)
