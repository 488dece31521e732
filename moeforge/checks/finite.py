"""NaN and Inf: a build stops rather than write them.

Every source safetensors file is read once anyway, for its sha256 (writer/hashing.py); `FileScan` checks
each floating-point tensor in that same pass, window by window, so a NaN or Inf in any source tensor stops
the build with the tensor and file named, at no extra read (--no-check-finite skips it). What the scan
found is remembered with the file's sha256 (`SourceHashCache`), so a rebuild that reads no source still
knows. Tensors moeforge converts (dtype changes, noise, residual scale, LoRA, routers) are also checked
chunk by chunk as they are written, which also catches values a cast to float16 overflows.

The test is on the bits: a float is NaN or Inf when all its exponent bits are set. As signed integers,
finite positives lie below the positive infinity pattern and finite negatives below the negative one as
unsigned integers, so two integer max-reductions decide a whole chunk (no temporary arrays); a chunk that
fails is then counted exactly.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from moeforge.errors import ConfigError, MoeforgeError, SourceError
from moeforge.plan.tensors import FromConcat, FromSource, FromValue, PlannedTensor
from moeforge.sources.checkpoint import DTYPES, TensorRef

# safetensors dtype -> (bytes, exponent mask): NaN/Inf have every bit of the mask set. float8_e4m3fn has
# no Inf and a single NaN pattern per sign (S.1111.111), so its "exponent" mask covers the mantissa too.
EXPONENT: Dict[str, Tuple[int, int]] = {
    "F64": (8, 0x7FF0000000000000), "F32": (4, 0x7F800000), "F16": (2, 0x7C00), "BF16": (2, 0x7F80),
    "F8_E5M2": (1, 0x7C), "F8_E4M3": (1, 0x7F),
}
STEP = 1024 * 1024  # bytes per reduction: stays in cache between the two passes


def count_nonfinite(buf, code: str) -> int:
    """NaN and Inf values among the bytes `buf` (whole elements) of a tensor of safetensors dtype `code`."""
    spec = EXPONENT.get(code)
    if spec is None or len(buf) == 0:
        return 0
    import numpy as np

    size, mask = spec
    signed = np.frombuffer(buf, dtype=f"<i{size}")
    unsigned = signed.view(f"<u{size}")
    positive, negative = mask, mask | (1 << (8 * size - 1))
    bad, step = 0, STEP // size
    for i in range(0, len(signed), step):
        if signed[i:i + step].max() >= positive or unsigned[i:i + step].max() >= negative:
            part = unsigned[i:i + step]
            bad += int(np.count_nonzero((part & np.array(mask, dtype=part.dtype)) == mask))
    return bad


class FileScan:
    """NaN/Inf per tensor of one safetensors file, fed the file's bytes in order (`feed`), in windows of
    any size; an element cut by a window boundary is checked once both halves have arrived."""

    def __init__(self, refs: Iterable[TensorRef]):
        self.spans = sorted((r.start, r.end, r.dtype, r.name) for r in refs
                            if r.dtype in EXPONENT and r.start is not None and r.end > r.start)
        self.nonfinite: Dict[str, int] = {}
        self._next = 0
        self._carry = b""

    def feed(self, offset: int, window) -> None:
        end = offset + len(window)
        view = memoryview(window)
        while self._next < len(self.spans):
            start, stop, code, name = self.spans[self._next]
            if start >= end:
                return
            lo, hi = max(start, offset), min(stop, end)
            if hi > lo:
                self._take(name, code, view[lo - offset:hi - offset])
            if stop > end:
                return
            self._next += 1

    def _take(self, name: str, code: str, piece) -> None:
        size = EXPONENT[code][0]
        if self._carry:
            need = size - len(self._carry)
            self._carry += bytes(piece[:need])
            piece = piece[need:]
            if len(self._carry) < size:
                return
            self._count(name, code, self._carry)
            self._carry = b""
        whole = len(piece) - len(piece) % size
        self._count(name, code, piece[:whole])
        self._carry = bytes(piece[whole:])

    def _count(self, name: str, code: str, buf) -> None:
        n = count_nonfinite(buf, code)
        if n:
            self.nonfinite[name] = self.nonfinite.get(name, 0) + n


def nonfinite_error(path, nonfinite: Dict[str, int]) -> Optional[SourceError]:
    """The one-line error for a source file whose tensors hold NaN/Inf (None when they hold none)."""
    if not nonfinite:
        return None
    name, count = next(iter(nonfinite.items()))
    more = f" (and {len(nonfinite) - 1} more tensor(s))" if len(nonfinite) > 1 else ""
    return SourceError(f"{path}: tensor {name!r} contains {count} NaN/Inf value(s){more}; nothing was written "
                       "(--no-check-finite builds anyway)")


def check_converted_chunk(chunk, t: PlannedTensor) -> None:
    """Called by the writer for every converted chunk; names the cause when it finds NaN/Inf."""
    if count_nonfinite(chunk, t.dtype):
        raise _describe(t)


def _describe(t: PlannedTensor) -> MoeforgeError:
    import torch

    src = t.source
    if isinstance(src, FromValue):
        return MoeforgeError(f"{t.name}: computed values contain NaN or Inf (check the expert prompts); nothing was written")
    if isinstance(src, FromConcat):
        src = max(src.leaves(), key=_blame)
    assert isinstance(src, FromSource)
    x = src.checkpoint.load(src.name)
    bad = int(x.numel() - torch.isfinite(x).sum())
    if bad:
        return SourceError(f"{src.ref.file}: tensor {src.name!r} contains {bad} NaN/Inf value(s)")
    if src.noise_scale or src.scale is not None:
        limit = f"noise_scale/residual_scale of {src.checkpoint.label}"
    else:
        limit = f"values of {src.checkpoint.label} tensor {src.name!r}"
    biggest = float(x.float().abs().max())
    return ConfigError(
        f"dtype: {DTYPES[t.dtype][0]} cannot hold {t.name} ({limit}, largest magnitude {biggest:.3g}, overflow); "
        "use bfloat16 or float32"
    )


def _blame(src: FromSource):
    """Which part of a joined tensor to name: one with NaN/Inf, else the one of largest magnitude."""
    import torch

    x = src.checkpoint.load(src.name).float()
    return (1, 0.0) if not bool(torch.isfinite(x).all()) else (0, float(x.abs().max()))
