"""Planned tensors and where their bytes come from: a source tensor, several joined, or a computed value."""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Optional, Tuple, Union

from moeforge.sources.checkpoint import DTYPES, Checkpoint

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class Part:
    """A contiguous range of a source tensor along one dimension (fine-grained experts)."""

    dim: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Reinit:
    """Re-draw some slices along `dim` from N(mean, std) of the tensor itself (Drop-Upcycling)."""

    dim: int
    indices: Tuple[int, ...]
    seed: int

    def apply(self, x):
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.tensor(self.indices, dtype=torch.long)
        shape = list(x.shape)
        shape[self.dim] = len(self.indices)
        fresh = torch.randn(shape, generator=gen) * x.std() + x.mean()
        return x.index_copy(self.dim, idx, fresh)


@dataclasses.dataclass(frozen=True)
class FromSource:
    """A source tensor (or a part of it) with optional LoRA delta, re-initialised slices, noise and scale,
    applied in that order before the cast to the output dtype."""

    checkpoint: Checkpoint
    name: str
    scale: Optional[float] = None
    noise_scale: Optional[float] = None
    noise_seed: Optional[int] = None
    delta: Optional[object] = None  # a sources.lora.LoraDelta
    part: Optional[Part] = None
    reinit: Optional[Reinit] = None

    @property
    def ref(self):
        return self.checkpoint.ref(self.name)

    @property
    def shape(self) -> Tuple[int, ...]:
        shape = list(self.ref.shape)
        if self.part is not None:
            shape[self.part.dim] = self.part.stop - self.part.start
        return tuple(shape)

    @property
    def transformed(self) -> bool:
        return self.whole_tensor or (self.scale is not None and self.scale != 1.0)

    @property
    def whole_tensor(self) -> bool:
        """Transforms that need the whole tensor at once (their result must not depend on chunking)."""
        return bool(self.noise_scale) or self.delta is not None or self.reinit is not None

    def byte_range(self) -> Optional[Tuple[int, int]]:
        """(start, stop) file offsets when the output is exactly a byte range of a safetensors file."""
        ref = self.ref
        if self.transformed or ref.start is None:
            return None
        if self.part is None:
            return ref.start, ref.end
        if self.part.dim != 0:
            return None
        row = ref.nbytes // max(ref.shape[0], 1)
        return ref.start + self.part.start * row, ref.start + self.part.stop * row

    def tensors(self, chunk_bytes: int):
        """The output values as torch tensors, in row chunks of about `chunk_bytes` where transforms allow."""
        if self.whole_tensor:
            x = self.checkpoint.load(self.name).float()
            if self.delta is not None:
                x = x + self.delta.compute()
            if self.part is not None:
                x = x.narrow(self.part.dim, self.part.start, self.part.stop - self.part.start)
            if self.reinit is not None:
                x = self.reinit.apply(x)
            if self.noise_scale:
                import torch

                gen = torch.Generator().manual_seed(self.noise_seed)
                x = x + torch.randn(x.shape, generator=gen) * self.noise_scale
            yield x * self.scale if self.scale is not None else x
            return
        ref = self.ref
        row_range = (self.part.start, self.part.stop) if self.part is not None and self.part.dim == 0 else None
        first, last = row_range or (0, ref.shape[0] if ref.shape else 1)
        row_bytes = max(1, ref.nbytes // max(ref.shape[0] if ref.shape else 1, 1)) * 4  # float32 headroom
        step = max(1, chunk_bytes // row_bytes)
        for start in range(first, last, step):
            x = self.checkpoint.load_rows(self.name, start, min(last, start + step))
            if self.part is not None and self.part.dim != 0:
                x = x.narrow(self.part.dim, self.part.start, self.part.stop - self.part.start)
            yield x * self.scale if self.scale is not None else x  # in the source dtype, as mergekit


@dataclasses.dataclass(frozen=True)
class FromConcat:
    """Several sources joined along `dim` (0: rows, 1: columns), streamed piece by piece: shared experts
    concatenated along the intermediate dimension (gate/up rows, down columns), and the members of a fused
    expert tensor (rows; a part may then itself be a join along columns)."""

    parts: Tuple[Union[FromSource, "FromConcat"], ...]
    dim: int

    def leaves(self) -> Tuple[FromSource, ...]:
        return tuple(q for p in self.parts for q in (p.leaves() if isinstance(p, FromConcat) else (p,)))

    @property
    def shape(self) -> Tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)

    def byte_range(self) -> Optional[Tuple[int, int]]:
        return None

    def tensors(self, chunk_bytes: int):
        """Row chunks of the joined tensor: each part in turn (dim 0), or row blocks of every part side by
        side (dim 1); memory stays within about `chunk_bytes` plus what a part's own transforms need."""
        if self.dim == 0:
            for part in self.parts:
                yield from part.tensors(chunk_bytes)
            return
        import torch

        rows = self.shape[0]
        row_bytes = 4 * sum(p.ref.nbytes // max(p.ref.shape[0], 1) for p in self.parts)
        step = max(1, chunk_bytes // row_bytes)
        streams = [_RowStream(p.tensors(max(1, chunk_bytes // len(self.parts)))) for p in self.parts]
        for start in range(0, rows, step):
            pieces = [s.take(min(step, rows - start)) for s in streams]
            dtype = pieces[0].dtype
            for x in pieces[1:]:
                dtype = torch.promote_types(dtype, x.dtype)  # widening only: the later cast is exact
            yield torch.cat([x.to(dtype) for x in pieces], dim=1)


class _RowStream:
    """Hands out exactly n rows at a time from a generator of row chunks of any size."""

    def __init__(self, chunks):
        self.chunks, self.pending, self.count = chunks, [], 0

    def take(self, n: int):
        import torch

        while self.count < n:
            x = next(self.chunks)
            self.pending.append(x)
            self.count += x.shape[0]
        x = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.count = ([x[n:]] if x.shape[0] > n else []), x.shape[0] - n
        return x[:n]


@dataclasses.dataclass(frozen=True, eq=False)
class FromValue:
    """A tensor computed by moeforge (router weights, zero biases); small by construction."""

    tensor: object  # torch.Tensor, or a Deferred computed when it is first needed

    def value(self):
        return self.tensor.value() if isinstance(self.tensor, Deferred) else self.tensor


class Deferred:
    """A small tensor whose shape is known before its values (router weights).

    Indexing gives another Deferred, so a plan can be made, sized and its shard headers written before the
    values exist: the writer starts copying while the routers are computed (and `moeforge plan` computes
    nothing at all). `value()` computes once, whichever thread asks first; an error is re-raised to every
    caller.
    """

    def __init__(self, shape: Tuple[int, ...], compute: Callable[[], object]):
        self.shape = tuple(int(d) for d in shape)
        self._compute = compute
        self._lock = threading.Lock()
        self._value = None
        self._error: Optional[BaseException] = None

    def __getitem__(self, index: int) -> "Deferred":
        if not isinstance(index, int) or not -self.shape[0] <= index < self.shape[0]:
            raise IndexError(f"index {index!r} for a deferred tensor of shape {self.shape}")
        return Deferred(self.shape[1:], lambda: self.value()[index])

    def map(self, shape: Tuple[int, ...], fn: Callable[[object], object]) -> "Deferred":
        return Deferred(shape, lambda: fn(self.value()))

    def contiguous(self) -> "Deferred":
        return self

    def value(self):
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._value is None:
                try:
                    value = self._compute()
                    if tuple(value.shape) != self.shape:
                        raise AssertionError(f"computed shape {tuple(value.shape)}, planned {self.shape}")
                    self._value = value.contiguous()
                except BaseException as e:
                    self._error = e
                    raise
            return self._value


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: str  # safetensors code of the output
    source: Union[FromSource, FromConcat, FromValue]
    routed: bool = False  # a routed expert's tensor: counts once per chosen expert in active parameters

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def raw_parts(self) -> Optional[Tuple[FromSource, ...]]:
        """The sources whose byte ranges (`byte_range()`), one after another, are exactly the output bytes:
        one for a plain copy, several for a join along rows (fused experts); None when bytes must be converted."""
        src = self.source
        parts = src.parts if isinstance(src, FromConcat) and src.dim == 0 else (src,)
        if all(isinstance(p, FromSource) and p.ref.dtype == self.dtype and p.byte_range() is not None for p in parts):
            return parts
        return None


def output_dtype(source_code: str, out_code: str) -> str:
    """Floating tensors take the output dtype; integer buffers keep theirs."""
    return out_code if source_code in FLOAT_CODES else source_code
