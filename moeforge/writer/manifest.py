"""moeforge_manifest.json: sha256 of every output file and of every source file a build read.

It is written last, beside the shards, and has no timestamps, so an identical build gives identical bytes.
`moeforge verify` checks an output against it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from moeforge._version import __version__
from moeforge.files import GENERATION_CONFIG, MANIFEST, TOKENIZER_FILES

if TYPE_CHECKING:
    from moeforge.writer.resume import Job

FORMAT = "moeforge-manifest/1"
# Read by a build although they hold no tensors: recorded so the manifest says what the output came from.
_BASE_EXTRAS = (GENERATION_CONFIG,) + TOKENIZER_FILES
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def source_files(inputs: "Job") -> Dict[str, Dict[str, Path]]:
    """model reference -> {name relative to the model directory: path}, for every file a build reads."""
    found: Dict[str, Dict[str, Path]] = {}
    for ref, ckpt in inputs.checkpoints.items():
        paths = {t.file for t in ckpt.tensors.values()} | {ckpt.path / "config.json"}
        extras = _INDEXES + (_BASE_EXTRAS if ckpt is inputs.base else ())
        paths |= {ckpt.path / n for n in extras if (ckpt.path / n).is_file()}
        found[ref] = {os.path.relpath(p, ckpt.path): p for p in sorted(paths)}
    return found


def write_manifest(out_dir: Path, outputs: Dict[str, str], sources: Dict[str, Dict[str, dict]],
                   layout: str, family: str, source_hashes: bool) -> None:
    """`outputs`: file name -> sha256 (every file in `out_dir`); `sources`: reference -> name -> record."""
    files = {name: {"size": (out_dir / name).stat().st_size, "sha256": outputs[name]} for name in sorted(outputs)}
    manifest = {
        "format": FORMAT,
        "moeforge_version": __version__,
        "layout": layout,
        "family": family,
        "files": files,
        "source_hashes": "sha256" if source_hashes else "size+mtime",
        "sources": {ref: dict(sorted(recs.items())) for ref, recs in sources.items()},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def read_manifest(out_dir: Path) -> Optional[dict]:
    """The manifest, None when absent; ValueError when it is not one."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError(f"not a {FORMAT} manifest")
    return data
