"""NaN/Inf in sources stop a build by default, found in the pass that hashes each source file.

The bit test is checked against torch.isfinite on every 8- and 16-bit pattern; the scan against windows
that cut elements in two; builds against sources with NaN/Inf in byte-copied tensors (float32, bfloat16,
float16), the opt-out, the source hash cache and a source in the Hugging Face cache. The one-line errors
of the CLI are in test_bad_inputs.py's corpus.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import expert_config
from safetensors.torch import load_file, save_file

import moeforge
from moeforge.checks.finite import EXPONENT, FileScan, count_nonfinite
from moeforge.errors import SourceError
from moeforge.sources.checkpoint import DTYPES, read_safetensors_header

DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("code", ["F16", "BF16", "F8_E5M2", "F8_E4M3"])
def test_bit_test_agrees_with_torch_on_every_pattern(code):
    size = EXPONENT[code][0]
    bits = torch.arange(256 ** size, dtype=torch.int32).to(torch.uint8 if size == 1 else torch.int16)
    values = bits.view(getattr(torch, DTYPES[code][0]))
    expected = int((~torch.isfinite(values.float())).sum())
    assert expected > 0
    assert count_nonfinite(bits.numpy().tobytes(), code) == expected


@pytest.mark.parametrize("code", ["F64", "F32"])
def test_bit_test_agrees_with_torch_on_wide_floats(code):
    x = torch.randn(5000, dtype=getattr(torch, DTYPES[code][0])) * 1e30
    x[[3, 700, 4999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    x[10] = -torch.finfo(x.dtype).max  # the largest finite patterns, either sign, are finite
    x[11] = torch.finfo(x.dtype).max
    assert count_nonfinite(x.numpy().tobytes(), code) == 3


@pytest.mark.parametrize("window", [1, 3, 7, 64, 1 << 20])
def test_scan_names_each_tensor_whatever_the_windows(tmp_path, window):
    tensors = {
        "a.bf16": torch.zeros(33, dtype=torch.bfloat16), "b.f32": torch.zeros(7, 3), "c.int": torch.arange(9),
        "d.f16": torch.zeros(5, dtype=torch.float16), "e.f8": torch.zeros(11).to(torch.float8_e4m3fn),
        "f.f64": torch.zeros(4, dtype=torch.float64),
    }
    tensors["a.bf16"][[0, 32]] = float("nan")
    tensors["b.f32"][6, 2] = -float("inf")
    tensors["d.f16"][2] = float("inf")
    tensors["e.f8"][10] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    scan = FileScan(read_safetensors_header(path).values())
    data = path.read_bytes()
    for offset in range(0, len(data), window):
        scan.feed(offset, data[offset:offset + window])
    assert scan.nonfinite == {"a.bf16": 2, "b.f32": 1, "d.f16": 1, "e.f8": 1}


def _poisoned(src: Path, dst: Path, dtype=None, value=float("nan")) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors[DOWN][1, 2] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _cfg(models, expert: Path, dtype: str) -> dict:
    cfg = expert_config(models["base"], [models["code"], str(expert)], gate_mode="random")
    cfg["dtype"] = dtype
    return cfg


@pytest.mark.parametrize("dtype,value", [("float32", float("nan")), ("bfloat16", float("inf")),
                                         ("float16", -float("inf"))])
def test_nonfinite_byte_copied_source_stops_the_build(models, tmp_path, dtype, value):
    """The expert's tensors are in the output dtype, so they are copied byte for byte (never decoded)."""
    expert = _poisoned(Path(models["story"]), tmp_path / "story", getattr(torch, dtype), value)
    with pytest.raises(SourceError) as e:
        moeforge.build(_cfg(models, expert, dtype), tmp_path / "out", random_seed=0, quiet=True)
    assert str(expert / "model.safetensors") in str(e.value) and repr(DOWN) in str(e.value)
    assert "1 NaN/Inf" in str(e.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["story"]


def test_opt_out_builds_and_the_cache_does_not_hide_a_nan(models, tmp_path, monkeypatch):
    """--no-check-finite copies the NaN; the hash it cached says nothing about finiteness, so the next
    default build reads the file again and stops; after a clean build, a rebuild reads no source."""
    from moeforge.writer import hashing

    monkeypatch.setenv(hashing.CACHE_DIR_ENV, str(tmp_path / "cache"))
    reads = []
    real = hashing.FileHasher.run  # reads source files
    monkeypatch.setattr(hashing.FileHasher, "run", lambda self, p, *a: reads.append(Path(p)) or real(self, p, *a))
    expert = _poisoned(Path(models["story"]), tmp_path / "story")
    cfg = _cfg(models, expert, "float32")
    moeforge.build(cfg, tmp_path / "unchecked", random_seed=0, quiet=True, check_finite=False)
    written = {}
    for shard in (tmp_path / "unchecked").glob("*.safetensors"):
        written.update(load_file(str(shard)))
    assert any(torch.isnan(t).any() for t in written.values())
    assert expert / "model.safetensors" in reads

    with pytest.raises(SourceError, match="NaN/Inf"):
        moeforge.build(cfg, tmp_path / "checked", random_seed=0, quiet=True)

    clean = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    moeforge.build(clean, tmp_path / "clean", random_seed=0, quiet=True)
    reads.clear()
    moeforge.build(clean, tmp_path / "again", random_seed=0, quiet=True)
    assert reads == []  # the sha256 and finiteness of every source are remembered
    cache = json.loads((tmp_path / "cache" / "source-sha256.json").read_text())
    rec = cache[str((Path(models["story"]) / "model.safetensors").resolve())]
    assert rec["nonfinite"] == {} and len(rec["sha256"]) == 64


def test_no_hash_sources_still_checks(models, tmp_path):
    expert = _poisoned(Path(models["story"]), tmp_path / "story")
    with pytest.raises(SourceError, match="NaN/Inf"):
        moeforge.build(_cfg(models, expert, "float32"), tmp_path / "out", random_seed=0, quiet=True,
                       hash_sources=False)


def test_hub_cache_source_is_checked(models, tmp_path, monkeypatch):
    """Files in the Hugging Face cache need no hashing (blobs are named by sha256) but are still checked."""
    import hashlib

    import huggingface_hub.constants as constants

    poisoned = _poisoned(Path(models["story"]), tmp_path / "poisoned")
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--story"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(poisoned, snapshot)
    weights = snapshot / "model.safetensors"
    blob = repo / "blobs" / hashlib.sha256(weights.read_bytes()).hexdigest()
    blob.parent.mkdir()
    shutil.move(weights, blob)
    weights.symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    cfg = expert_config(models["base"], [models["code"], "tiny-org/story"], gate_mode="random")
    with pytest.raises(SourceError, match=f"model.safetensors: tensor '{DOWN}' contains 1 NaN/Inf"):
        moeforge.build(cfg, tmp_path / "out", random_seed=0, quiet=True)
