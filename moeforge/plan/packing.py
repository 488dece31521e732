"""Fused-expert layouts: planned member tensors joined into the stored tensors the layout declares.

A stored tensor is its members' bytes one after another (layouts.base.Packed), so it is planned as their
row-wise concatenation under the stored shape: the writer copies the members' byte ranges one after another
where they are unchanged, and converts them part by part otherwise.
"""
from __future__ import annotations

from typing import List

from moeforge.errors import SourceError
from moeforge.layouts.base import Layout
from moeforge.plan.tensors import FromConcat, PlannedTensor


def pack(layout: Layout, tensors: List[PlannedTensor], num_layers: int, num_experts: int) -> List[PlannedTensor]:
    """`tensors` with the members of each of `layout.packed` replaced by the stored tensor."""
    if not layout.packed:
        return tensors
    by_name = {t.name: t for t in tensors}
    for layer in range(num_layers):
        for packed in layout.packed:
            names = packed.members(layout, layer, num_experts)
            present = [n for n in names if n in by_name]
            if not present:
                continue  # no shared expert
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))
                raise AssertionError(f"{packed.stored_name(layer)}: members {missing[:3]} were not planned")
            members = [by_name.pop(n) for n in names]
            by_name[packed.stored_name(layer)] = _joined(packed.stored_name(layer), members,
                                                         packed.stored_shape([m.shape for m in members], num_experts))
    return list(by_name.values())


def _joined(name: str, members: List[PlannedTensor], shape) -> PlannedTensor:
    dtypes = {m.dtype for m in members}
    cols = {m.shape[1:] for m in members}
    if len(dtypes) > 1 or len(cols) > 1:
        raise SourceError(f"{name}: its parts differ in dtype {sorted(dtypes)} or columns {sorted(cols)}")
    parts = []
    for m in members:  # joins along rows are flattened into one
        src = m.source
        parts.extend(src.parts if isinstance(src, FromConcat) and src.dim == 0 else [src])
    return PlannedTensor(name, tuple(shape), members[0].dtype, FromConcat(tuple(parts), dim=0),
                         routed=any(m.routed for m in members))
