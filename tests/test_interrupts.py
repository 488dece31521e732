"""Interrupted builds in real processes: SIGKILL, SIGINT and SIGTERM mid-build, then --resume gives the bytes an
uninterrupted build gives; a write that fails (file size limit, as a full disk would) leaves nothing behind.

The build is stopped at a known point by tests/support/hold_build.py (the CLI, sleeping once that many shards
are written, fsynced and recorded); the signal itself is real.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import expert_config

import moeforge
from moeforge.writer.resume import STATE, partial_dirs

SHARD = "25KB"  # the toy MoE (bfloat16) then has 4 shards
HOLD_BUILD = Path(__file__).parent / "support" / "hold_build.py"


def _cmd(cfg_path, out, quiet=True):
    return [sys.executable, "-m", "moeforge", "build", str(cfg_path), str(out), "--out-shard-size", SHARD,
            "--random-seed", "3"] + (["--quiet"] if quiet else [])


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def _recorded_shards(out: Path) -> int:
    for d in partial_dirs(out):
        try:
            return len(json.loads((d / STATE).read_text())["shards"])
        except (OSError, ValueError):
            pass
    return 0


def _start_and_hold(cfg_path, out, shards: int) -> subprocess.Popen:
    cmd = [sys.executable, str(HOLD_BUILD), str(shards)] + _cmd(cfg_path, out)[3:]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _recorded_shards(out) < shards:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the build never reached the hold point"
        time.sleep(0.1)
    return proc


def _files(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """The uninterrupted build, and its config."""
    root = tmp_path_factory.mktemp("interrupts")
    cfg_path = root / "moe.yml"
    cfg_path.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]],
                                                     gate_mode="random", dtype="bfloat16")))
    moeforge.build(cfg_path, root / "ref", random_seed=3, out_shard_size=SHARD, quiet=True)
    assert len(list((root / "ref").glob("model-*.safetensors"))) >= 3
    return cfg_path, _files(root / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_build_resumes_to_identical_bytes(reference, tmp_path, sig):
    cfg_path, expected = reference
    out = tmp_path / "out"
    proc = _start_and_hold(cfg_path, out, shards=2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)

    assert not out.exists()
    [partial] = partial_dirs(out)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert str(partial) in lines[0] and "--resume" in lines[0]
    state = json.loads((partial / STATE).read_text())
    kept = {name: (partial / name).stat().st_ino for name in state["shards"]}
    assert len(kept) == 2

    if sig == signal.SIGKILL:  # a recorded shard damaged afterwards is caught by its sha256 and written again
        damaged = sorted(kept)[1]
        with open(partial / damaged, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\x00\x00")
        del kept[damaged]

    moeforge.build(cfg_path, out, random_seed=3, out_shard_size=SHARD, quiet=True, resume=True)
    assert _files(out) == expected  # every file, manifest included
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # reused, not rewritten
    assert partial_dirs(out) == []


@pytest.mark.slow
def test_a_running_build_is_never_disturbed_and_a_plain_rerun_starts_over(reference, tmp_path):
    from click.testing import CliRunner

    from moeforge.cli import cli

    cfg_path, expected = reference
    out = tmp_path / "out"
    proc = _start_and_hold(cfg_path, out, shards=1)
    [partial] = partial_dirs(out)
    before = sorted(p.name for p in partial.iterdir())
    for extra in ([], ["--resume"]):  # a second build of OUT while the first one runs
        r = CliRunner().invoke(cli, _cmd(cfg_path, out)[3:] + extra)  # in-process: the same command line
        assert r.exit_code == 1 and f"another moeforge build is writing {partial}" in r.stderr, r.stderr
    assert sorted(p.name for p in partial.iterdir()) == before
    proc.kill()
    proc.wait(timeout=60)

    r = CliRunner().invoke(cli, _cmd(cfg_path, out, quiet=False)[3:])
    assert r.exit_code == 0, r.stderr
    assert "discarding the partial build" in r.stderr and "--resume" in r.stderr
    assert _files(out) == expected and partial_dirs(out) == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC would behave
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))


@pytest.mark.slow
def test_failed_write_leaves_nothing(reference, models, tmp_path):
    cfg_path, _ = reference
    out = tmp_path / "out"
    r = subprocess.run(_cmd(cfg_path, out), env=_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "model-00001-of-" in lines[0] and "write failed (File too large)" in lines[0]
    assert not out.exists() and partial_dirs(out) == []


def test_a_router_failure_while_copying_stops_the_writer_and_leaves_nothing(models, tmp_path, monkeypatch):
    """Random routers are computed while the writer copies; when that fails, the copy stops, and the error is
    the one the user sees."""
    import moeforge.gates
    from moeforge.errors import MoeforgeError

    def failing(mode, inputs):
        raise MoeforgeError("routers failed on purpose")

    monkeypatch.setattr(moeforge.gates, "compute_gates", failing)
    out = tmp_path / "out"
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    with pytest.raises(MoeforgeError, match="on purpose"):
        moeforge.build(cfg, out, out_shard_size="50KB", quiet=True)
    assert not out.exists() and partial_dirs(out) == []


def test_byte_copies_come_first_in_each_shard_and_load_by_offsets(models, tmp_path):
    """Routers are written after the copied tensors of their shard; readers go by data_offsets."""
    import struct

    from safetensors import safe_open

    out = tmp_path / "out"
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random", dtype=None)
    moeforge.build(cfg, out, quiet=True)
    raw = (out / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert list(header) == by_offset  # the header lists tensors in data order
    routers = [i for i, k in enumerate(by_offset) if k.endswith("block_sparse_moe.gate.weight")]
    assert routers == list(range(len(by_offset) - len(routers), len(by_offset)))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(by_offset[-1]).abs().sum() > 0


def test_without_copy_file_range_the_bytes_are_the_same(reference, monkeypatch, tmp_path):
    """Filesystems or kernels that refuse copy_file_range get plain reads and writes, with the same output."""
    import errno

    from moeforge.writer import safetensors_stream

    cfg = yaml.safe_load(reference[0].read_text())
    cfg["dtype"] = None  # the toy models' own dtype: every expert tensor is a byte copy
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(safetensors_stream.os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(safetensors_stream, "_HAS_COPY_FILE_RANGE", True)
    moeforge.build(cfg, tmp_path / "plain", random_seed=3, out_shard_size=SHARD, quiet=True)
    monkeypatch.undo()
    moeforge.build(cfg, tmp_path / "copied", random_seed=3, out_shard_size=SHARD, quiet=True)
    assert len(calls) == 1  # refused once, not asked again for every tensor
    assert _files(tmp_path / "plain") == _files(tmp_path / "copied")
