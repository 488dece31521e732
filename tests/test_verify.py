"""The manifest and `moeforge verify`: a good build verifies; each kind of damage is named."""
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import expert_config

import moeforge
from moeforge.cli import cli
from moeforge.verify import verify
from moeforge.writer.manifest import MANIFEST

SHARD_1 = "model-00001-of-00004.safetensors"
SHARD_2 = "model-00002-of-00004.safetensors"


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    moeforge.build(cfg, root / "out", random_seed=5, out_shard_size="50KB", quiet=True, check_finite=True)
    return cfg, root / "out"


def test_manifest_records_every_output_and_source_file(built, models):
    _, out = built
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    for name, rec in manifest["files"].items():
        assert rec == {"size": (out / name).stat().st_size, "sha256": _sha(out / name)}
    assert manifest["layout"] == "mixtral" and manifest["family"] == "llama"
    assert set(manifest["sources"]) == {models["base"], models["code"], models["story"]}
    base = manifest["sources"][models["base"]]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(base)
    assert base["model.safetensors"]["sha256"] == _sha(Path(models["base"]) / "model.safetensors")
    assert set(manifest["sources"][models["code"]]) == {"model.safetensors", "config.json"}


def test_same_inputs_give_identical_bytes_manifest_included(built, tmp_path):
    cfg, out = built
    moeforge.build(cfg, tmp_path / "again", random_seed=5, out_shard_size="50KB", quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}


def test_source_hashing_can_be_skipped(built, models, tmp_path):
    cfg, _ = built
    moeforge.build(cfg, tmp_path / "o", random_seed=5, quiet=True, hash_sources=False)
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    rec = manifest["sources"][models["base"]]["model.safetensors"]
    assert manifest["source_hashes"] == "size+mtime" and set(rec) == {"size", "mtime_ns"}
    assert all("sha256" in r for r in manifest["files"].values())  # outputs are always hashed


def test_source_hashes_are_remembered_until_the_file_changes(models, tmp_path, monkeypatch):
    """A rebuild from the same experts reads none of them again; a source rewritten since is hashed anew."""
    import os

    from moeforge.writer import hashing

    monkeypatch.setenv(hashing.CACHE_DIR_ENV, str(tmp_path / "cache"))
    src = tmp_path / "story"
    shutil.copytree(models["story"], src)
    hashed = []
    real = hashing.FileHasher.run  # reads source files
    monkeypatch.setattr(hashing.FileHasher, "run", lambda self, p, *a: hashed.append(Path(p).name) or real(self, p, *a))
    cfg = expert_config(models["base"], [models["code"], str(src)], gate_mode="random")

    def build(name):
        hashed.clear()
        moeforge.build(cfg, tmp_path / name, random_seed=5, quiet=True)
        return json.loads((tmp_path / name / MANIFEST).read_text())["sources"][str(src)]["model.safetensors"]

    first = build("first")
    assert "model.safetensors" in hashed and first["sha256"] == _sha(src / "model.safetensors")
    assert build("again") == first and hashed == []  # every source remembered (outputs are hashed as written)

    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size; mtime set back: only the inode's change time tells
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = build("changed")
    assert hashed == ["model.safetensors"] and changed["sha256"] == _sha(weights) != first["sha256"]

    monkeypatch.setenv(hashing.NO_CACHE_ENV, "1")
    build("uncached")
    assert hashed.count("model.safetensors") == 3 and hashed.count("config.json") == 3  # all of every source


def _verify(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def test_a_good_build_verifies(built):
    r = _verify(built[1])
    assert r.exit_code == 0, r.stdout
    assert "ok (" in r.stdout and "sha256" in r.stdout and "NaN/Inf" in r.stdout


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def _poison_first_value(out):
    p = out / SHARD_2
    raw, n, header = _header(p)
    start = 8 + n + min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    p.write_bytes(raw[:start] + struct.pack("<f", float("nan")) + raw[start + 4:])


def _remap_in_index(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = next(k for k, v in index["weight_map"].items() if v == SHARD_1)
    index["weight_map"][name] = SHARD_2
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_config(**changes):
    def edit(out):
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(changes)
        (out / "config.json").write_text(json.dumps(cfg))

    return edit


def _add_tensor(out):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / SHARD_1))
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(out / SHARD_1), metadata={"format": "pt"})


DAMAGE = {
    "nan_value": (_poison_first_value, [f"{SHARD_2}: sha256 does not match", f"{SHARD_2}: tensor", "1 NaN/Inf"]),
    "extra_file": (lambda o: (o / "notes.txt").write_text("hi"), ["notes.txt: not in the manifest"]),
    "missing_shard": (lambda o: (o / SHARD_2).unlink(), [f"{SHARD_2}: listed in the manifest but missing"]),
    "index_remapped": (_remap_in_index, ["which the index maps to", "model.safetensors.index.json: sha256"]),
    "more_experts_in_config": (_edit_config(num_local_experts=3), ["experts.2.w1.weight'", "missing",
                                                                    "has shape (2, 32), config.json implies (3, 32)"]),
    "dtype_in_config": (_edit_config(dtype="float16"), ["is F32, config.json says F16"]),
    "truncated_shard": (lambda o: (o / SHARD_1).write_bytes((o / SHARD_1).read_bytes()[:-100]),
                        [f"{SHARD_1}: size", "truncated"]),
    "trailing_bytes": (lambda o: (o / SHARD_1).write_bytes((o / SHARD_1).read_bytes() + b"\0" * 8),
                       [f"{SHARD_1}: 8 byte(s) after the last tensor"]),
    "no_manifest": (lambda o: (o / MANIFEST).unlink(), [f"{MANIFEST}: missing"]),
    "stray_shard": (lambda o: shutil.copy(o / SHARD_1, o / "model-extra.safetensors"),
                    ["model-extra.safetensors: a safetensors file the index does not list"]),
    "unexpected_tensor": (_add_tensor, ["'model.layers.0.mystery.weight' is not part of a mixtral model"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named(built, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(built[1], out)
    fn, needles = DAMAGE[damage]
    fn(out)
    r = _verify(out)
    assert r.exit_code == 1, r.stdout
    problems = [line for line in r.stdout.splitlines() if line.startswith("problem: ")]
    for needle in needles:
        assert any(needle in p for p in problems), (needle, r.stdout)
    assert "problem(s)" in r.stdout.splitlines()[-1]


def test_quick_reads_headers_only(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[1], out)
    _poison_first_value(out)  # same size, different bytes: only the data pass sees it
    assert _verify(out, "--quick").exit_code == 0
    assert _verify(out).exit_code == 1


def test_verify_needs_a_directory(tmp_path):
    r = _verify(tmp_path / "nothing")
    assert r.exit_code == 2 and r.stderr.strip() == f"moeforge: error: {tmp_path / 'nothing'}: not a directory"


@pytest.mark.parametrize("architecture,base,shared", [
    ("qwen", "base", 1), ("qwen", "qwen2", 2), ("qwen3", "qwen3", 0), ("deepseek", "base", 0), ("deepseek", "base", 2),
])
def test_every_layout_verifies(models, qwen_models, tmp_path, architecture, base, shared):
    """What verify expects comes from the layout registry: shared experts, their gate and width, key spellings."""
    base = {**models, **qwen_models}[base]
    cfg = expert_config(base, [base, base], gate_mode="random", architecture=architecture,
                        shared_experts=[{"source_model": base, "positive_prompts": ["x"] if architecture == "qwen" else None}
                                        for _ in range(shared)] or None)
    moeforge.build(cfg, tmp_path / "o", random_seed=1, quiet=True, allow_all_same=True)
    report = verify(tmp_path / "o")
    assert report.ok, report.problems
