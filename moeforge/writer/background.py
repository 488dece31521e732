"""The shard writer on its own thread, so the calling thread computes routers and side files meanwhile.

Copying releases the GIL (copy_file_range, fdatasync), and so do most of torch's kernels: on two cores the
routers' imports and computation cost no wall time. Errors of either thread end both; the writer's are
re-raised in the caller's thread, Ctrl-C and SIGTERM (which arrive there) stop the writer before they go on.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class BackgroundWrite:
    """`with BackgroundWrite(write_sharded, ..., stop=event) as w: ...; result = w.result()`.

    `fn` must accept `stop` (a threading.Event) and return soon after it is set.
    """

    def __init__(self, fn: Callable[..., Any], *args, stop: Optional[threading.Event] = None, **kwargs):
        self.stop = stop or threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, {**kwargs, "stop": self.stop}),
                                        name="moeforge-write", daemon=True)

    def __enter__(self) -> "BackgroundWrite":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # the caller failed or was interrupted: stop the writer, then go on raising
            self.stop.set()
            self._join()

    def result(self) -> Any:
        self._join()
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e
            self.stop.set()

    def _join(self) -> None:
        while self._thread.is_alive():  # a timed join, so Ctrl-C still reaches the waiting thread
            self._thread.join(0.05)
