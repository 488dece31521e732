"""A second virtualenv with transformers 4.57 and CPU torch, made once in `.venv-tf4/` at the repo root.

The tests that check what transformers 4.x reads run there in subprocesses. Making it takes about
1-2 minutes on 2 cores (pip downloads transformers 4.57 and moeforge's dependencies from PyPI; torch 2.13.0
comes from the CPU wheel on disk); later runs reuse it. It is remade when its requirements change or when a
previous attempt stopped half-way (the marker file is written last).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-tf4"
# moeforge runs there from the work tree (PYTHONPATH), so a build under 4.57 uses the code under test
REQUIREMENTS = [
    os.environ.get("TORCH_SPEC", "torch==2.13.0"),  # the CPU wheel on disk; an unpinned torch pulls CUDA
    "transformers==4.57.*",
    "tokenizers", "safetensors", "accelerate", "huggingface_hub", "pydantic>=2.5,<3", "click>=8.1",
    "PyYAML>=6", "tqdm>=4.60",
]
_MARKER = VENV / ".moeforge-ready"
_STAMP = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()


def python() -> Path:
    return VENV / "bin" / "python"


def ensure() -> Path:
    """The venv's python, made first if needed. Raises RuntimeError with pip's last lines when that fails."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".venv-tf4.lock", "w") as lock:  # one maker at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _MARKER.is_file() and _MARKER.read_text().split("\n")[0] == _STAMP and python().exists():
            return python()
        start = time.monotonic()
        shutil.rmtree(VENV, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", str(VENV)])
        _run([str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS])
        version = subprocess.run([str(python()), "-c", "import transformers; print(transformers.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        _MARKER.write_text(f"{_STAMP}\ntransformers {version}, made in {time.monotonic() - start:.0f} s\n")
        return python()


def _run(cmd) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"making {VENV} failed: {' '.join(map(str, cmd))} exited {done.returncode}:\n{tail}")


if __name__ == "__main__":
    print(ensure())
    print(_MARKER.read_text().split("\n")[1])
