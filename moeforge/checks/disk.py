"""Enough free disk for the whole output, checked with statvfs before the first byte is written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from moeforge.errors import MoeforgeError
from moeforge.units import human_bytes

HEADER_BYTES_PER_TENSOR = 512  # a generous bound on one tensor's JSON header entry
SLACK = 1 << 20  # config.json, the resolved recipe, the manifest, filesystem rounding


def output_bytes(plan, base_dir: Path, side_file_names) -> int:
    side = sum((base_dir / n).stat().st_size for n in side_file_names if (base_dir / n).is_file())
    return plan.nbytes + HEADER_BYTES_PER_TENSOR * len(plan.tensors) + side + SLACK


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes for an unprivileged writer at `path`, or None when the filesystem reports no sizes."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize if getattr(st, "f_blocks", 1) else None


def existing_parent(out: Path) -> Path:
    where = Path(out).absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def check_free_space(out: Path, needed: int) -> None:
    """OUT is built beside itself, on the same filesystem; an old OUT is freed only after the new one is in place."""
    where = existing_parent(out)
    free = free_bytes(where)
    if free is not None and free < needed:
        raise MoeforgeError(
            f"{out}: not enough free disk space on {where}: the build needs {human_bytes(needed)}, {human_bytes(free)} is free"
        )
