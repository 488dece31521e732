"""A streaming safetensors writer.

Headers are computed from the plan, so each shard is written front to back exactly once. Tensors whose
bytes are unchanged are copied file to file (copy_file_range: no Python buffers, the GIL released), with
the next source ranges prefetched and the output written back while the copy goes on; others are
converted in bounded row chunks. Memory does not grow with model or shard size.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from moeforge.checks.finite import check_converted_chunk
from moeforge.errors import MoeforgeError
from moeforge.plan.tensors import FromValue, PlannedTensor
from moeforge.sources.checkpoint import DTYPES

CHUNK_BYTES = 64 * 1024 * 1024  # float32 working set of one conversion chunk
COPY_STEP = 256 * 1024 * 1024  # bytes per copy_file_range call: how soon Ctrl-C is noticed
FLUSH_EVERY = 1024 * 1024 * 1024  # write back this much while copying
PREFETCH_BYTES = 256 * 1024 * 1024  # source bytes asked for ahead of the copy
_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")
_HAS_FADVISE = hasattr(os, "posix_fadvise")
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has none
# copy_file_range errors that mean "not here": fall back to reads and writes
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@dataclasses.dataclass
class ShardedWriteResult:
    files: List[str]
    weight_map: Dict[str, str]
    total_size: int


def split_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> List[List[PlannedTensor]]:
    """Greedy in plan order; a tensor larger than the limit gets a shard of its own."""
    shards: List[List[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def encode_header(tensors: Sequence[PlannedTensor], metadata: Optional[dict] = None) -> bytes:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def data_order(shard: Sequence[PlannedTensor]) -> List[PlannedTensor]:
    """Byte copies first, computed tensors (routers, conversions) last: the writer copies while the routers
    are still being computed, and reaches them at the end of the shard. Readers go by `data_offsets`."""
    return [t for t in shard if t.raw_parts() is not None] + [t for t in shard if t.raw_parts() is None]


def write_sharded(out_dir: Path, tensors: Sequence[PlannedTensor], max_shard_bytes: int, progress=None,
                  journal=None) -> ShardedWriteResult:
    """`journal` (writer.resume.BuildSession): `begin(path)` is True for a verified shard to skip;
    `completed(path)` follows each shard written."""
    shards = [data_order(s) for s in split_shards(tensors, max_shard_bytes)]
    names = shard_names(len(shards))
    weight_map: Dict[str, str] = {}
    with _Copier() as copier:
        for name, shard in zip(names, shards):
            path = out_dir / name
            if journal is not None and journal.begin(path):
                if progress is not None:
                    progress.update(sum(t.nbytes for t in shard))
            else:
                copier.write_shard(path, shard, progress)
                if journal is not None:
                    journal.completed(path)
            weight_map.update({t.name: name for t in shard})
    result = ShardedWriteResult(names, weight_map, sum(t.nbytes for t in tensors))
    if len(names) > 1:
        index = {"metadata": {"total_size": result.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    verify_shards(out_dir, shards, names)
    return result


def write_file(path: Path, tensors: Sequence[PlannedTensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """One unsharded safetensors file (small outputs such as adapted routers), verified like the shards."""
    with _Copier() as copier:
        copier.write_shard(Path(path), tensors, None, metadata)
    verify_shards(Path(path).parent, [tensors], [Path(path).name])


def verify_shards(out_dir: Path, shards, names) -> None:
    """Re-open every shard with the reference reader and compare names, dtypes and shapes to the plan."""
    from safetensors import safe_open

    for name, shard in zip(names, shards):
        with safe_open(str(out_dir / name), framework="pt") as f:
            if set(f.keys()) != {t.name for t in shard}:
                raise MoeforgeError(f"{name}: written tensors do not match the plan")
            for t in shard:
                s = f.get_slice(t.name)
                if tuple(s.get_shape()) != tuple(t.shape) or s.get_dtype() != t.dtype:
                    raise MoeforgeError(f"{name}: tensor {t.name} was written with the wrong shape or dtype")


class _Copier:
    """Owns read-only source descriptors and the write-back thread for the duration of a write."""

    def __init__(self):
        self._fds: Dict[Path, int] = {}
        self._use_copy_file_range = _HAS_COPY_FILE_RANGE
        self._flusher: Optional[_Flusher] = None

    def __enter__(self):
        self._flusher = _Flusher()
        return self

    def __exit__(self, *exc):
        self._flusher.stop()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _src_fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            if _HAS_FADVISE:  # larger readahead when the source is not in the page cache, as cp does
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def write_shard(self, path: Path, shard: Sequence[PlannedTensor], progress, metadata=None) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, encode_header(shard, metadata))
            ranges = [(p.ref.file, p.byte_range()) for t in shard for p in t.raw_parts() or ()]
            prefetch = _Prefetcher(ranges, self._src_fd)
            unflushed = 0
            for t in shard:
                parts = t.raw_parts()
                if parts is not None:
                    for part in parts:
                        prefetch.next()
                        (start, end), path_in = part.byte_range(), part.ref.file
                        self._copy_range(self._src_fd(path_in), fd, start, end - start, path_in)
                else:
                    for chunk in _converted_chunks(t):
                        check_converted_chunk(chunk, t)  # NaN/Inf stop the build (checks/finite.py)
                        _write_all(fd, chunk)
                if progress is not None:
                    progress.update(t.nbytes)
                unflushed += t.nbytes
                if unflushed >= FLUSH_EVERY:
                    self._flusher.request(fd)
                    unflushed = 0
            os.fsync(fd)
        except OSError as e:
            raise MoeforgeError(f"{path}: write failed ({e.strerror or e})") from None
        finally:
            self._flusher.forget(fd)
            os.close(fd)

    def _copy_range(self, src: int, dst: int, offset: int, count: int, src_path: Path) -> None:
        done = 0
        if self._use_copy_file_range:
            try:
                while done < count:
                    n = os.copy_file_range(src, dst, min(COPY_STEP, count - done), offset + done)
                    if n == 0:
                        raise MoeforgeError(f"{src_path}: ended early while copying (file truncated?)")
                    done += n
                return
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
                # not on this filesystem or kernel: plain reads from here on; dst's position is still consistent
                self._use_copy_file_range = False
        while done < count:
            buf = os.pread(src, min(CHUNK_BYTES, count - done), offset + done)
            if not buf:
                raise MoeforgeError(f"{src_path}: ended early while copying (file truncated?)")
            _write_all(dst, buf)
            done += len(buf)


class _Prefetcher:
    """Asks the kernel to read the next PREFETCH_BYTES of source ranges while the current one is copied, so
    disk reads overlap the copy when the sources are not cached (no effect on a warm cache)."""

    def __init__(self, ranges, fd_of):
        self._ranges = ranges if _HAS_FADVISE else []
        self._fd_of = fd_of
        self._current = -1  # index of the range being copied
        self._asked = 0  # ranges before this index were asked for
        self._ahead = 0  # bytes asked for and not copied yet

    def next(self) -> None:
        """Call before copying each range, in order."""
        self._current += 1
        if self._current < self._asked:
            start, end = self._ranges[self._current][1]
            self._ahead -= end - start
        self._asked = max(self._asked, self._current + 1)
        while self._asked < len(self._ranges) and self._ahead < PREFETCH_BYTES:
            file, (start, end) = self._ranges[self._asked]
            os.posix_fadvise(self._fd_of(file), start, end - start, os.POSIX_FADV_WILLNEED)
            self._ahead += end - start
            self._asked += 1


class _Flusher:
    """Writes back the output's dirty pages (fdatasync) on its own thread while the copy goes on, so the
    fsync that ends each shard waits for little, and dirty pages never pile up to the kernel's limits."""

    def __init__(self):
        self._wanted: List[int] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._busy: Optional[int] = None
        self._thread = threading.Thread(target=self._run, name="moeforge-flush", daemon=True)
        self._thread.start()

    def request(self, fd: int) -> None:
        with self._cond:
            if fd not in self._wanted:
                self._wanted.append(fd)
                self._cond.notify_all()

    def forget(self, fd: int) -> None:
        """Before closing `fd`: drop its pending request and wait for a flush of it in progress."""
        with self._cond:
            if fd in self._wanted:
                self._wanted.remove(fd)
            while self._busy == fd:
                self._cond.wait()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._wanted.clear()
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                fd = self._busy = self._wanted.pop(0)
            try:
                _fdatasync(fd)
            except OSError:
                pass  # the fsync that ends the shard reports real errors
            with self._cond:
                self._busy = None
                self._cond.notify_all()


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _as_bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _converted_chunks(t: PlannedTensor):
    import torch

    out_dtype = getattr(torch, DTYPES[t.dtype][0])
    src = t.source
    if isinstance(src, FromValue):
        yield _as_bytes(src.value().to(out_dtype))
        return
    for x in src.tensors(CHUNK_BYTES):
        yield _as_bytes(x.to(out_dtype))
