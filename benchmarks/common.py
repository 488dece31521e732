"""Shared by the benchmark scripts: models, configs, the mergekit virtualenv, timed runs."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MERGEKIT_SPEC = "mergekit==0.1.5"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # CPU build first, as scripts/setup.sh does

# One topic per expert; each expert's prompts differ, so prompt-based gates are well conditioned.
PROMPTS = [
    ["def add(a, b): return a + b", "Write a Python function that sorts a list"],
    ["Once upon a time there was a dragon"],
    ["Solve for x: 2x + 3 = 7"],
    ["Das ist ein Satz auf Deutsch"],
]


def models(size: str) -> List[Path]:
    sys.path.insert(0, str(HERE))
    from make_checkpoints import make_models

    return make_models(size, WORK / "models")


def write_config(path: Path, model_dirs: Sequence[Path], gate_mode: str, dtype: str = "bfloat16",
                 one_prompt: bool = False) -> Path:
    """A mergekit-moe config (which moeforge accepts as is): base = the first model, one expert per model.
    `one_prompt` keeps each expert's first prompt only, so no prompt batch needs padding."""
    import yaml

    experts = []
    for i, m in enumerate(model_dirs):
        e = {"source_model": str(m)}
        if gate_mode != "random":  # mergekit-moe 0.1.5 wants prompts for every other mode, uniform_random too
            e["positive_prompts"] = PROMPTS[i % len(PROMPTS)][: 1 if one_prompt else None]
        experts.append(e)
    cfg = {"base_model": str(model_dirs[0]), "gate_mode": gate_mode, "dtype": dtype, "experts": experts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mergekit_venv(requested: Optional[str] = None) -> Path:
    """A virtualenv with mergekit-moe: the one given (or $MERGEKIT_VENV), else benchmarks/work/mkvenv, made here
    from the package registry (torch CPU build first, so mergekit does not pull a CUDA build)."""
    given = requested or os.environ.get("MERGEKIT_VENV")
    venv = Path(given) if given else WORK / "mkvenv"
    if (venv / "bin" / "mergekit-moe").exists():
        return venv
    if given:
        raise SystemExit(f"{venv}: has no bin/mergekit-moe")
    print(f"creating {venv} with {MERGEKIT_SPEC} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_SPEC], check=True)
    subprocess.run(pip + [MERGEKIT_SPEC], check=True)
    return venv


# Runs moeforge from another source tree (argv[1]) even where this one is installed in editable mode.
_FROM_SOURCE = (
    "import sys; src = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
    "sys.path.insert(0, src); from moeforge.cli import main; sys.argv[0] = 'moeforge'; main()"
)


def moeforge_cmd(config: Path, out: Path, seed: int = 0, extra: Sequence[str] = (), src: Optional[str] = None) -> List[str]:
    """The build command; `src` runs moeforge from another source tree (before/after comparisons)."""
    launch = ["-c", _FROM_SOURCE, src] if src else ["-m", "moeforge"]
    return [sys.executable, *launch, "build", str(config), str(out), "--random-seed", str(seed), "--quiet", *extra]


def mergekit_cmd(venv: Path, config: Path, out: Path, seed: int = 0, extra: Sequence[str] = ()) -> List[str]:
    return [str(venv / "bin" / "mergekit-moe"), str(config), str(out), "--random-seed", str(seed), "--quiet",
            "--device", "cpu", *extra]


# Spawns the command from a small Python and reports its rusage: a child forked straight from this (large)
# process would inherit this process's peak RSS in ru_maxrss. The floor is that small Python's ~10 MB.
_RUSAGE = (
    "import os, sys, time; out = sys.argv[1]; t = time.perf_counter(); "
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); _, st, ru = os.wait4(pid, 0); "
    "open(out, 'w').write(f'{time.perf_counter() - t} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} "
    "{os.waitstatus_to_exitcode(st)}')"
)


@dataclasses.dataclass
class Measured:
    wall_s: float
    peak_rss: int  # bytes
    cpu_s: float  # user + system


def measure(cmd: Sequence[str], log: Optional[Path] = None, env: Optional[dict] = None) -> Measured:
    """Wall time, peak RSS and CPU time of one command (`env`: extra variables); raises if it fails."""
    log = log or WORK / "last-run.log"
    result = log.with_suffix(".rusage")
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-S", "-c", _RUSAGE, str(result), *cmd], stdout=out, stderr=out, check=True,
                       env={**os.environ, **(env or {})})
    wall, rss_kb, cpu, code = result.read_text().split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit code {code}:\n{log.read_text(errors='replace')[-3000:]}")
    return Measured(float(wall), int(rss_kb) * 1024, float(cpu))


def settle() -> None:
    """Start each timed run with no dirty pages left by the previous one."""
    os.sync()
    time.sleep(1.0)


def set_cache(paths: Sequence[Path], state: str) -> None:
    """Put these files' pages in the page cache ("warm": read them) or out of it ("cold": drop them, after
    settle() made them clean). Only these files are touched, never the machine's whole cache."""
    files = [f for p in paths for f in ([p] if Path(p).is_file() else sorted(Path(p).rglob("*"))) if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 16 << 20):
                    pass
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
