"""Planned tensors and the two places their bytes come from."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from moeforge.sources.checkpoint import DTYPES, Checkpoint

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class FromSource:
    """A source tensor, optionally with Gaussian noise and a scale applied (in float32) before the cast."""

    checkpoint: Checkpoint
    name: str
    scale: Optional[float] = None
    noise_scale: Optional[float] = None
    noise_seed: Optional[int] = None
    delta: Optional[object] = None  # a sources.lora.LoraDelta added before noise and scale

    @property
    def ref(self):
        return self.checkpoint.ref(self.name)

    @property
    def transformed(self) -> bool:
        return bool(self.noise_scale) or (self.scale is not None and self.scale != 1.0) or self.delta is not None


@dataclasses.dataclass(frozen=True, eq=False)
class FromValue:
    """A tensor computed before writing (router weights, zero biases); small by construction."""

    tensor: object  # torch.Tensor


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: str  # safetensors code of the output
    source: Union[FromSource, FromValue]
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

    @property
    def is_raw_copy(self) -> bool:
        """True when the output bytes are exactly a byte range of a source safetensors file."""
        src = self.source
        return isinstance(src, FromSource) and not src.transformed and src.ref.start is not None and src.ref.dtype == self.dtype


def output_dtype(source_code: str, out_code: str) -> str:
    """Floating tensors take the output dtype; integer buffers keep theirs."""
    return out_code if source_code in FLOAT_CODES else source_code
