"""`moeforge verify OUT`: does a checkpoint hold what it claims?

Checks, in one sequential read of each shard: the manifest (sizes and sha256 of every file), the index json
against the shard headers, each shard's byte layout, every tensor's name, shape and dtype against what
config.json implies for the layout, and NaN/Inf values. Problems are collected, not raised: the report
lists them all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from moeforge.errors import ConfigError, MoeforgeError
from moeforge.plan.tensors import FLOAT_CODES
from moeforge.sources.checkpoint import CODE_OF, DTYPES, TensorRef, read_safetensors_header
from moeforge.writer.manifest import MANIFEST, read_manifest

INDEX = "model.safetensors.index.json"
CHUNK = 32 * 1024 * 1024


@dataclasses.dataclass
class Report:
    out: Path
    problems: List[str] = dataclasses.field(default_factory=list)
    files: int = 0
    tensors: int = 0
    hashed: bool = False
    scanned: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        checked = ["manifest", "index", "shapes", "dtypes"]
        checked += ["sha256"] if self.hashed else []
        checked += ["NaN/Inf"] if self.scanned else []
        if self.ok:
            return f"{self.out}: ok ({self.files} files, {self.tensors} tensors; checked {', '.join(checked)})"
        return f"{self.out}: {len(self.problems)} problem(s) ({self.files} files, {self.tensors} tensors)"


def verify(out, hashes: bool = True, values: bool = True) -> Report:
    """All checks; `hashes=False, values=False` (--quick) reads headers only."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{out}: not a directory")
    report = Report(out, hashed=hashes, scanned=values)
    manifest = _check_manifest_listing(out, report)
    listed = (manifest or {}).get("files", {})
    shards, refs, unknown = _read_weights(out, report)
    report.tensors = len(refs)
    _check_expected(out, refs, unknown, report)
    for shard in shards:
        digest, bad = _scan_shard(out / shard, [r for r in refs.values() if r.file.name == shard], report,
                                  hashes and shard in listed, values)
        _check_digest(shard, digest, listed, report)
        for name, n in bad.items():
            report.problems.append(f"{shard}: tensor {name!r} has {n} NaN/Inf value(s)")
    if hashes:
        for name in sorted(set(listed) - set(shards)):
            if (out / name).is_file():
                _check_digest(name, _sha256(out / name), listed, report)
    return report


def _check_manifest_listing(out: Path, report: Report) -> Optional[dict]:
    present = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    report.files = len(present)
    try:
        manifest = read_manifest(out)
    except ValueError as e:
        report.problems.append(f"{MANIFEST}: {e}")
        return None
    if manifest is None:
        report.problems.append(f"{MANIFEST}: missing (not built by moeforge, or removed)")
        return None
    for name, rec in sorted(manifest["files"].items()):
        if name not in present:
            report.problems.append(f"{name}: listed in the manifest but missing")
        elif isinstance(rec, dict) and (out / name).stat().st_size != rec.get("size"):
            report.problems.append(f"{name}: size {(out / name).stat().st_size} bytes, the manifest says {rec.get('size')}")
    for name in sorted(present - set(manifest["files"]) - {MANIFEST}):
        report.problems.append(f"{name}: not in the manifest")
    return manifest


def _read_weights(out: Path, report: Report) -> Tuple[List[str], Dict[str, TensorRef], set]:
    """Shard headers, checked against the index json: readable shards, name -> ref for every tensor found,
    and the names the index puts in unreadable shards (not reported again as missing)."""
    weight_map: Optional[Dict[str, str]] = None
    total_size = None
    if (out / INDEX).is_file():
        try:
            data = json.loads((out / INDEX).read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            total_size = (data.get("metadata") or {}).get("total_size")
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            report.problems.append(f"{INDEX}: unreadable (expected a JSON object with a weight_map)")
            weight_map = None
        shards = sorted(set(weight_map.values())) if weight_map else []
    else:
        shards = ["model.safetensors"] if (out / "model.safetensors").is_file() else []
    if not shards and weight_map is None:
        report.problems.append("no weights: neither model.safetensors nor a readable index")
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in shards)
    report.problems += [f"{s}: a safetensors file the index does not list" for s in stray]
    refs: Dict[str, TensorRef] = {}
    unreadable = set()
    for shard in list(shards):
        try:
            header = read_safetensors_header(out / shard)
        except MoeforgeError as e:
            report.problems.append(str(e).replace(f"{out / shard}", shard, 1))
            shards.remove(shard)
            unreadable.add(shard)
            continue
        for name, ref in header.items():
            if name in refs:
                report.problems.append(f"{shard}: tensor {name!r} is also in {refs[name].file.name}")
            elif weight_map is not None and weight_map.get(name) != shard:
                report.problems.append(f"{shard}: holds tensor {name!r}, which the index maps to {weight_map.get(name)}")
            refs[name] = ref
    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            if name not in refs and shard in shards:
                report.problems.append(f"{INDEX}: maps {name!r} to {shard}, which does not hold it")
        actual = sum(r.nbytes for r in refs.values())
        if total_size is not None and total_size != actual and not unreadable:
            report.problems.append(f"{INDEX}: total_size is {total_size}, the tensors hold {actual} bytes")
    unknown = {n for n, s in (weight_map or {}).items() if s in unreadable} | ({"*"} if unreadable and weight_map is None else set())
    return shards, refs, unknown


def _check_expected(out: Path, refs: Dict[str, TensorRef], unknown: set, report: Report) -> None:
    from moeforge.checks.expected import dense_output_shapes, output_shapes
    from moeforge.families import family_for_model_type
    from moeforge.layouts import layout_of_config

    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        report.problems.append(f"config.json: unreadable ({e})")
        return
    layout = layout_of_config(config)
    family = family_for_model_type(config.get("model_type")) if layout is None else None
    if layout is None and family is None:
        report.problems.append(f"config.json: architectures {config.get('architectures')} is not a moeforge layout "
                               "or a dense model moeforge writes")
        return
    kind = layout.name if layout is not None else config["model_type"]
    try:
        expected = output_shapes(config, layout) if layout is not None else dense_output_shapes(config, family)
    except (KeyError, TypeError, ValueError) as e:
        report.problems.append(f"config.json: cannot derive the expected tensors ({type(e).__name__}: {e})")
        return
    if expected is None:
        dense = layout.dense_type(config) if layout is not None else kind
        report.problems.append(f"config.json: transformers cannot build a {dense} model from it")
        return
    want_dtype = CODE_OF.get(str(config.get("dtype") or config.get("torch_dtype") or ""))
    missing = [] if "*" in unknown else sorted(set(expected) - set(refs) - unknown)
    report.problems += [f"tensor {n!r}: missing (config.json implies shape {expected[n]})" for n in missing[:20]]
    if len(missing) > 20:
        report.problems.append(f"... and {len(missing) - 20} more missing tensors")
    tied = config.get("tie_word_embeddings")
    for name, ref in sorted(refs.items()):
        if name not in expected:
            if not (tied and name == "lm_head.weight"):
                report.problems.append(f"{ref.file.name}: tensor {name!r} is not part of a {kind} model")
            continue
        if tuple(ref.shape) != expected[name]:
            report.problems.append(
                f"{ref.file.name}: tensor {name!r} has shape {tuple(ref.shape)}, config.json implies {expected[name]}"
            )
        if want_dtype and ref.dtype in FLOAT_CODES and ref.dtype != want_dtype:
            report.problems.append(f"{ref.file.name}: tensor {name!r} is {ref.dtype}, config.json says {want_dtype}")


def _scan_shard(path: Path, refs: List[TensorRef], report: Report, hashes: bool, values: bool):
    """One front-to-back read: sha256 of the whole file, NaN/Inf per tensor, and the byte layout."""
    refs = sorted(refs, key=lambda r: r.start)
    size = path.stat().st_size
    data_start = refs[0].start if refs else size
    tiled = all(r.start == prev for r, prev in zip(refs, [data_start] + [r.end for r in refs]))
    if not tiled:
        report.problems.append(f"{path.name}: tensors overlap or leave gaps in the data")
    elif refs and refs[-1].end != size:
        report.problems.append(f"{path.name}: {size - refs[-1].end} byte(s) after the last tensor")
    if not (hashes or values):
        return None, {}
    if tiled:  # header, tensors, trailing bytes: the spans tile the file, so one pass gives the digest too
        spans = [(0, data_start, None)] + [(r.start, r.end, r) for r in refs] + [(refs[-1].end if refs else size, size, None)]
        h = hashlib.sha256() if hashes else None
    else:
        spans = [(r.start, r.end, r) for r in refs] if values else []
        h = None
    bad = _read_spans(path, spans, h, values)
    if hashes and not tiled:
        return _sha256(path), bad
    return (h.hexdigest() if h is not None else None), bad


def _read_spans(path: Path, spans, h, values: bool) -> Dict[str, int]:
    from moeforge.checks.finite import count_nonfinite

    bad: Dict[str, int] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end, ref in spans:
            step = CHUNK - CHUNK % (DTYPES[ref.dtype][1] if ref is not None else 1)
            for offset in range(start, end, step):
                buf = bytearray(os.pread(fd, min(step, end - offset), offset))
                if h is not None:
                    h.update(buf)
                if values and ref is not None:
                    n = count_nonfinite(buf, ref.dtype)
                    if n:
                        bad[ref.name] = bad.get(ref.name, 0) + n
    finally:
        os.close(fd)
    return bad


def _check_digest(name: str, digest: Optional[str], listed: dict, report: Report) -> None:
    rec = listed.get(name)
    if digest is None or not isinstance(rec, dict):
        return
    if rec.get("sha256") != digest:
        report.problems.append(f"{name}: sha256 does not match the manifest (the file changed since the build)")


def _sha256(path: Path) -> str:
    from moeforge.writer.hashing import sha256_file

    return sha256_file(path)
