"""sha256 of files, computed on background threads while the writer copies.

Bytes copied with copy_file_range never pass through Python, so they are hashed by a second read, from the
page cache. hashlib releases the GIL, so that read overlaps the copy instead of adding to it:
- each output shard is hashed while it is being appended to (`ShardFollower`), so when the last byte is
  written only the last chunk is left to hash, whatever the shard size;
- source files are hashed on another thread (`FileHasher`). Files in the Hugging Face cache are not read at
  all: the cache names each large file's blob by its sha256 (the Hub's LFS object id).
"""
from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

CHUNK = 8 * 1024 * 1024
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
Callback = Callable[[Path, str], None]


class HashStopped(Exception):
    pass


def sha256_file(path: Path, stop: Optional[threading.Event] = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise HashStopped(str(path))
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def known_sha256(path: Path) -> Optional[str]:
    """The sha256 a Hugging Face cache blob is named by (snapshots link to blobs/<sha256> for LFS files)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256_NAME.match(real.name):
        return real.name
    return None


def file_identity(path: Path) -> dict:
    """Cheap identity of a file (follows symlinks, as the Hugging Face cache uses them)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _Worker:
    """A daemon thread draining a queue of jobs; errors are re-raised by wait() on the caller's thread."""

    def __init__(self, name: str):
        self._queue: "queue.Queue" = queue.Queue()
        self.stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self.stop.is_set():
                    self.run(*job)
            except HashStopped:
                pass
            except BaseException as e:
                if self._error is None:
                    self._error = e
            finally:
                self._queue.task_done()

    def run(self, *job) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        """Until every job is done; polls, so Ctrl-C still interrupts the caller (Queue.join() would not)."""
        while self._queue.unfinished_tasks:
            self.stop.wait(0.02)
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):
                raise error
            raise RuntimeError(f"hashing failed: {error}") from error

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5 if cancel else None)


class FileHasher(_Worker):
    """Whole files, one after the other."""

    def __init__(self):
        super().__init__("moeforge-hash-files")

    def submit(self, path: Path, callback: Callback) -> None:
        self._queue.put((Path(path), callback))

    def run(self, path: Path, callback: Callback) -> None:
        callback(path, sha256_file(path, self.stop))


class ShardFollower(_Worker):
    """Hashes a file while a writer appends to it, front to back; `end(path)` says the writer is done."""

    def __init__(self):
        super().__init__("moeforge-hash-shards")
        self._ended: Dict[Path, threading.Event] = {}

    def begin(self, path: Path, callback: Callback) -> None:
        """Call before the writer creates `path` (no file may be there: the follower would read it)."""
        path = Path(path)
        self._ended[path] = threading.Event()
        self._queue.put((path, callback))

    def end(self, path: Path) -> None:
        self._ended[Path(path)].set()

    def run(self, path: Path, callback: Callback) -> None:
        ended = self._ended[path]
        while not path.exists():
            if self.stop.wait(0.005):
                raise HashStopped(str(path))
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            finishing = False
            while True:
                n = f.readinto(buf)
                if n:
                    h.update(view[:n])
                    continue
                if finishing:
                    break
                if ended.is_set():
                    finishing = True  # one more pass: everything written before end() is now readable
                    continue
                if self.stop.is_set():
                    raise HashStopped(str(path))
                ended.wait(0.01)
        del self._ended[path]
        callback(path, h.hexdigest())
