"""Work on a helper thread while the calling thread writes.

The build computes its routers and side files here while the main thread copies: copying releases the GIL
(copy_file_range, fdatasync), and so do most of torch's kernels, so the imports and the gate computation
cost little wall time. The writer stays on the main thread on purpose: Ctrl-C and SIGTERM arrive there, in
the middle of a copy or a wait, never inside an import running on the helper.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

JOIN_ON_ERROR_S = 10.0  # after a failure, how long to let the helper finish before going on without it


class Background:
    """`with Background(fn, *args) as task: ...; task.result()`: fn's value, or its exception re-raised here."""

    def __init__(self, fn: Callable[..., Any], *args, **kwargs):
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="moeforge-helper",
                                        daemon=True)

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # the caller failed or was interrupted; an import cannot be cut short
            self._thread.join(JOIN_ON_ERROR_S)

    def result(self) -> Any:
        while self._thread.is_alive():  # a timed join, so Ctrl-C still reaches the waiting thread
            self._thread.join(0.05)
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e
