"""NaN and Inf: a build stops rather than write them.

Converted tensors (dtype changes, noise, residual scale, routers) pass through memory anyway, so every chunk
is checked as it is written; the cost is one vectorised pass over bytes already in cache. Tensors copied byte
for byte (copy_file_range) are never decoded, which is what keeps a build at disk speed, so they are
scanned only with --check-finite, before the first byte is written, at the cost of one extra read.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable

from moeforge.errors import ConfigError, MoeforgeError, SourceError
from moeforge.plan.tensors import FLOAT_CODES, FromConcat, FromSource, FromValue, PlannedTensor
from moeforge.sources.checkpoint import DTYPES

SCAN_CHUNK = 32 * 1024 * 1024


def count_nonfinite(buf, code: str) -> int:
    """NaN and Inf values among the bytes `buf` of a tensor of safetensors dtype `code`."""
    import torch

    if code not in FLOAT_CODES or len(buf) == 0:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers: torch only reads them here
        x = torch.frombuffer(buf, dtype=torch.uint8).view(getattr(torch, DTYPES[code][0]))
    return int(x.numel() - torch.isfinite(x).sum())


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


def scan_raw_copies(tensors: Iterable[PlannedTensor]) -> None:
    """--check-finite: read every byte-copied floating tensor once, in file order, before writing."""
    by_file = {}
    for t in tensors:
        parts = t.raw_parts() if t.dtype in FLOAT_CODES else None
        for part in parts or ():
            ref, (start, end) = part.ref, part.byte_range()
            by_file.setdefault(ref.file, []).append((start, end, ref))
    for path, refs in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            for start, end, ref in sorted(refs, key=lambda r: r[0]):
                step = SCAN_CHUNK - SCAN_CHUNK % DTYPES[ref.dtype][1]
                bad = 0
                for offset in range(start, end, step):
                    buf = bytearray(os.pread(fd, min(step, end - offset), offset))
                    bad += count_nonfinite(buf, ref.dtype)
                if bad:
                    raise SourceError(f"{path}: tensor {ref.name!r} contains {bad} NaN/Inf value(s)")
        finally:
            os.close(fd)
