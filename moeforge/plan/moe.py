"""Plan an MoE checkpoint: base tensors pass through, expert MLPs are renamed into the layout, routers added."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import TYPE_CHECKING, List, Optional, Tuple

from moeforge.families.base import MLP_ROLES, layer_of
from moeforge.layouts.base import MoEShape
from moeforge.errors import SourceError
from moeforge.plan.packing import pack
from moeforge.plan.tensors import Deferred, FromConcat, FromSource, FromValue, PlannedTensor, output_dtype

if TYPE_CHECKING:
    from moeforge.pipeline.inputs import Inputs

# Zero tensors that make an input's attention fit a layout that always has them (same function).
_ZERO_FILLS = {"qkv_bias": ("q_proj", "k_proj", "v_proj")}


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
        """Parameters used per token: everything but the routed experts that are not chosen."""
        routed = sum(t.numel for t in self.tensors if t.routed)
        per_expert = routed // max(self.shape.num_experts, 1)
        return self.total_params - routed + per_expert * self.shape.experts_per_token

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def compute_values(self) -> None:
        """Compute every deferred value (routers) now, in this thread."""
        for t in self.tensors:
            if isinstance(t.source, FromValue):
                t.source.value()


def noise_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so noise does not depend on write order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sort_key(name: str) -> Tuple:
    """Embeddings, then layer by layer, then the rest; numbers compare as numbers (experts.2 < experts.10)."""
    natural = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, natural)
    return (0 if "embed" in name else 2, 0, natural)


def source_tensor(out_name: str, ckpt, name: str, out_dtype: str, seed: int, expert=None, role: Optional[str] = None,
                  routed: bool = False, **extra) -> PlannedTensor:
    """A planned copy of one source tensor, with the expert's noise/scale and any LoRA delta attached;
    `extra` (part, reinit, scale) comes from upcycling."""
    ref = ckpt.ref(name)
    noise = expert.noise_scale if expert is not None else None
    scale = expert.residual_scale if expert is not None and role == "down" else None
    extra_scale = extra.pop("scale", None)
    if extra_scale is not None:
        scale = extra_scale * (1.0 if scale is None else scale)
    source = FromSource(ckpt, name, scale=scale, noise_scale=noise,
                        noise_seed=noise_seed(seed, out_name) if noise else None, delta=ckpt.delta_for(name), **extra)
    return PlannedTensor(out_name, source.shape, output_dtype(ref.dtype, out_dtype), source, routed=routed)


def plan_moe(inputs: "Inputs", routers, shared_routers=None) -> MoEPlan:
    """`routers`: (layers, experts, hidden); `shared_routers`: (layers, 1, hidden) for gated shared experts."""
    base, layout, family, out_dtype, seed = inputs.base, inputs.layout, inputs.family, inputs.out_dtype, inputs.seed
    tensors: List[PlannedTensor] = []
    for name in base.tensors:
        if not (family.is_mlp(name) or family.is_skipped(name)):
            tensors.append(source_tensor(name, base, name, out_dtype, seed))
    tensors += _zero_fills(inputs)

    for layer in range(inputs.num_layers):
        tensors.append(_value(layout.router_name(layer), routers[layer], out_dtype))
        for index, (expert, ckpt) in enumerate(inputs.experts):
            mlp = inputs.family_of(ckpt).mlp_name
            inter = ckpt.ref(mlp("gate", layer)).shape[0]
            for role in MLP_ROLES:
                extras = inputs.expert_extras(index, layer, role, inter)
                tensors.append(source_tensor(layout.expert_name(role, layer, index), ckpt, mlp(role, layer),
                                             out_dtype, seed, expert, role, routed=True, **extras))
        if inputs.shared:
            tensors += [shared_tensor(inputs, layer, role) for role in MLP_ROLES]
        if layout.shared_router and inputs.shared:
            tensors.append(_value(layout.shared_router.format(layer=layer), shared_routers[layer], out_dtype))

    tensors = pack(layout, tensors, inputs.num_layers, len(inputs.experts))
    tensors.sort(key=lambda t: sort_key(t.name))
    return MoEPlan(tensors, moe_shape(inputs), inputs.num_layers)


def shared_tensor(inputs: "Inputs", layer: int, role: str) -> PlannedTensor:
    """The shared MLP: one shared expert as it is, several concatenated along the intermediate dimension
    (gate/up rows, down columns), so the MLP computes the sum of their outputs, each with its own
    residual_scale on its own down columns."""
    out_name = inputs.layout.shared_expert[role].format(layer=layer)
    planned = [
        source_tensor(out_name if i == 0 else f"{out_name}#{i}", ckpt, inputs.family_of(ckpt).mlp_name(role, layer),
                      inputs.out_dtype, inputs.seed, expert, role)
        for i, (expert, ckpt) in enumerate(inputs.shared)
    ]
    if len(planned) == 1:
        return planned[0]
    source = FromConcat(tuple(t.source for t in planned), dim=1 if role == "down" else 0)
    dtypes = {t.dtype for t in planned}
    if len(dtypes) > 1:
        raise SourceError(f"shared_experts: their {role} tensors have different dtypes {sorted(dtypes)}")
    return PlannedTensor(out_name, source.shape, planned[0].dtype, source)


def moe_shape(inputs: "Inputs") -> MoEShape:
    def intermediate(ckpt) -> int:
        return ckpt.ref(inputs.family_of(ckpt).mlp_name("gate", 0)).shape[0]

    return MoEShape(
        num_experts=len(inputs.experts),
        experts_per_token=inputs.experts_per_token,
        intermediate_size=intermediate(inputs.experts[0][1]) // inputs.granularity,
        num_shared_experts=len(inputs.shared),
        shared_intermediate_size=sum(intermediate(c) for _, c in inputs.shared),
        renormalize=inputs.config.renormalize is not False,
    )


def _value(name: str, tensor, out_dtype: str) -> PlannedTensor:
    tensor = tensor.contiguous()
    return PlannedTensor(name, tuple(tensor.shape), out_dtype, FromValue(tensor))


def _zero_fills(inputs: "Inputs") -> List[PlannedTensor]:
    missing = inputs.layout.required_features - inputs.family.features(inputs.base)
    fills = []
    for feature in sorted(missing):
        if feature not in _ZERO_FILLS:
            raise AssertionError(f"layout {inputs.layout.name} requires {feature} but cannot fill it")
        for layer in range(inputs.num_layers):
            for proj in _ZERO_FILLS[feature]:
                rows = inputs.base.ref(f"model.layers.{layer}.self_attn.{proj}.weight").shape[0]
                zeros = Deferred((rows,), functools.partial(_zeros, rows))  # planning imports no torch
                fills.append(_value(f"model.layers.{layer}.self_attn.{proj}.bias", zeros, inputs.out_dtype))
    return fills


def _zeros(rows: int):
    import torch

    return torch.zeros(rows)
