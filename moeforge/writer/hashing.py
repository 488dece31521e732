"""sha256 of files, computed on a background thread while the writer copies.

Bytes copied with copy_file_range never pass through Python, so output shards (and sources) are hashed by a
second read. hashlib releases the GIL, so that read overlaps the copy instead of adding to it. Shards go
first: their hashes make a partial build resumable.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

CHUNK = 8 * 1024 * 1024
SHARD, SOURCE = 0, 1  # priorities: lower runs first


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


class BackgroundHasher:
    """One worker thread; `submit` queues a file, `callback(path, sha256)` runs on the worker when it is done."""

    def __init__(self):
        self._queue: "queue.PriorityQueue" = queue.PriorityQueue()
        self._order = itertools.count()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self.results: Dict[Path, str] = {}
        self._thread = threading.Thread(target=self._work, name="moeforge-hasher", daemon=True)
        self._thread.start()

    def submit(self, path: Path, priority: int = SHARD, callback: Optional[Callable[[Path, str], None]] = None):
        self._queue.put((priority, next(self._order), Path(path), callback))

    def _work(self) -> None:
        while True:
            _, _, path, callback = self._queue.get()
            try:
                if path is None or self._stop.is_set():
                    continue
                digest = sha256_file(path, self._stop)
                self.results[path] = digest
                if callback is not None:
                    callback(path, digest)
            except HashStopped:
                pass
            except BaseException as e:  # reported to the main thread by wait()
                if self._error is None:
                    self._error = e
            finally:
                self._queue.task_done()
                if path is None:
                    return

    def wait(self) -> Dict[Path, str]:
        """Block until everything submitted is hashed; interruptible (Ctrl-C) unlike Queue.join()."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        while not done.wait(0.05):
            pass
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):
                raise error
            raise RuntimeError(f"hashing failed: {error}") from error
        return dict(self.results)

    def close(self, cancel: bool = False) -> None:
        """Stop the worker; with `cancel`, abandon the file being hashed (an interrupted build must exit fast)."""
        if cancel:
            self._stop.set()
        self._queue.put((-1 if cancel else 99, next(self._order), None, None))
        self._thread.join(timeout=None if not cancel else 5)


def file_identity(path: Path) -> dict:
    """Cheap identity of a file (follows symlinks, as the Hugging Face cache uses them)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
