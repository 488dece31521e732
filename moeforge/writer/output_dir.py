"""Nothing half-written at OUT: build beside it, fsync, rename into place at the very end."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from moeforge.errors import ConfigError


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")
    _check_parent_writable(out)


def _check_parent_writable(out: Path) -> None:
    """The temporary directory is made beside OUT, so OUT's nearest existing ancestor must take new entries."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out}: cannot create the output: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: cannot create the output: {parent} is not writable")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`, on any failure it is removed."""
    out = Path(out)
    check_output_path(out, overwrite)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moeforge-tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    except OSError as e:
        raise ConfigError(f"{out}: cannot create output here ({e.strerror or e})") from None
    try:
        yield tmp
        commit_output(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_output(tmp: Path, out: Path, overwrite: bool) -> None:
    """fsync everything in `tmp`, then rename it to `out` (an old `out` goes only at that moment)."""
    parent = out.absolute().parent
    _fsync_tree(tmp)
    check_output_path(out, overwrite)  # it may have appeared while we worked
    old = None
    if out.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.moeforge-old-", dir=parent))
        os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old / "previous", out)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
