"""The output directory: router.safetensors (routers only), wemoe.json (config, source hashes, training
summary, parameter counts) and a model card; `load` rebuilds the routed model from them and the sources."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Union

from moeforge._version import __version__
from moeforge.errors import SourceError
from moeforge.files import CARD as CARD_FILE

ROUTER_FILE = "router.safetensors"
META_FILE = "wemoe.json"
FORMAT = "moeforge-wemoe"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_record(ckpt, ref: str) -> dict:
    """Where a source lives and the sha256 of every file the merge reads (weights and config.json)."""
    files = sorted({t.file for t in ckpt.tensors.values()} | {ckpt.path / "config.json"})
    return {
        "ref": ref,
        "path": str(Path(ckpt.path).resolve()),
        "files": {str(Path(f).relative_to(ckpt.path)): sha256_file(Path(f)) for f in files},
    }


def sources_record(config, sources) -> dict:
    return {
        "base": source_record(sources.base, config.base_model),
        "experts": {t.name: source_record(c, t.source_model) for t, c in zip(config.experts, sources.experts)},
    }


def write_output(tmp: Path, model, config, record: dict, tta_summary: dict, wall_s: float) -> dict:
    """Write the three files into `tmp` (an atomic_output_dir); returns the wemoe.json contents."""
    from moeforge.plan.tensors import FromValue, PlannedTensor
    from moeforge.writer import write_file

    tensors = model.router_tensors()
    planned = [PlannedTensor(name, tuple(t.shape), "F32", FromValue(t)) for name, t in sorted(tensors.items())]
    write_file(tmp / ROUTER_FILE, planned, {"moeforge": __version__, "kind": "wemoe-routers",
                                           "tasks": ",".join(config.task_names)})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moeforge_version": __version__,
        "family": config.family,
        "tasks": config.task_names,
        "config": config.model_dump(mode="json"),
        "resolved": {
            "shared_router": config.uses_shared_router,
            "templates": config.resolved_templates if config.family == "clip-vision" else None,
            "routing": "sample-wise (batch_reduce false) when loaded for inference",
        },
        "sources": record,
        "routers": {
            "file": ROUTER_FILE,
            "sha256": sha256_file(tmp / ROUTER_FILE),
            "tensors": len(planned),
            "naming": ("shared_router.<param>: one router for every block (E-WEMoE)" if config.uses_shared_router
                       else f"{model.blocks_prefix}.<block>.mlp.router.<param>: one router per block"),
        },
        "tta": {**tta_summary, "wall_seconds": round(wall_s, 3)},
        "params": model.param_counts(),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (tmp / CARD_FILE).write_text(model_card(meta), encoding="utf-8")
    return meta


def model_card(meta: dict) -> str:
    cfg, params, tta = meta["config"], meta["params"], meta["tta"]
    rows = "\n".join(
        f"| {name} | `{rec['ref']}` | {', '.join(f'{f} `{h[:12]}`' for f, h in rec['files'].items())} |"
        for name, rec in [("base", meta["sources"]["base"]), *meta["sources"]["experts"].items()]
    )
    kind = "E-WEMoE" if cfg.get("sparsity") is not None else "WEMoE"
    loss = (f"entropy (summed over tasks) {tta['loss_first']:.4f} at step 1 -> {tta['loss_last']:.4f} "
            f"at step {tta['steps']}" if "loss_first" in tta else "no adaptation steps were run")
    return f"""---
tags: [moeforge, wemoe, model-merging, mixture-of-experts]
---
# {kind} routers for {len(meta['tasks'])} tasks ({meta['family']})

Weight-Ensembling MoE routers adapted at test time by `moeforge wemoe` {meta['moeforge_version']}.
This directory holds **routers only** (`{ROUTER_FILE}`, {params['trainable']:,} parameters); the merged
model is rebuilt from the source checkpoints listed below, which must be present and unchanged:

```python
import moeforge.wemoe
model = moeforge.wemoe.load("path/to/this/directory")   # sample-wise routed inference
```

Non-MLP weights: task arithmetic with lambda {cfg['init_lambda']}. Each block's MLP: base MLP + routed
sum of task vectors ({cfg['router_hidden_layers']}-layer router{', shared by all blocks' if meta['resolved']['shared_router'] else ''}{f", task vectors {cfg['sparsity']:.0%} sparse" if cfg.get('sparsity') is not None else ''}).
Test-time adaptation: {loss} (Adam, lr {cfg['tta']['lr']}, batch {cfg['tta']['batch_size']}).

| parameters | count |
| --- | ---: |
| trainable (routers) | {params['trainable']:,} ({params['trainable_percent']}%) |
| total (dense model + task vectors + routers) | {params['total']:,} |
| one dense model | {params['dense_model']:,} |

| role | source | files (sha256) |
| --- | --- | --- |
{rows}

Evaluate: `moeforge wemoe eval <this directory>` (per-task accuracy beside task arithmetic and each
fine-tuned model).
"""


def read_meta(out_dir: Union[str, Path]) -> dict:
    path = Path(out_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: missing (not a `moeforge wemoe` output directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SourceError(f"{path}: not a `moeforge wemoe` output (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise SourceError(f"{path}: written by a newer moeforge (format_version {meta['format_version']}); upgrade moeforge")
    return meta


def _source_path(rec: dict) -> str:
    return rec["path"] if Path(rec["path"]).is_dir() else rec["ref"]


def check_sources(record: dict, role: str, verify: bool) -> str:
    path = _source_path(record)
    if not verify:
        return path
    root = Path(path)
    if not root.is_dir():
        from moeforge.sources.resolve import resolve_model

        root = resolve_model(path)
    for name, digest in record["files"].items():
        f = root / name
        if not f.is_file():
            raise SourceError(f"{role} {record['ref']}: {name} is missing (pass verify=False / --no-verify to try anyway)")
        if sha256_file(f) != digest:
            raise SourceError(f"{role} {record['ref']}: {name} has changed since the routers were adapted "
                              "(sha256 mismatch; pass verify=False / --no-verify to load anyway)")
    return str(root)


def load(out_dir: Union[str, Path], device: str = "cpu", verify: bool = True):
    """Rebuild the WEMoE model of a `moeforge wemoe` output: sources merged, adapted routers loaded,
    sample-wise routing on (batch_reduce off), eval mode. Returns a WEMoEModel."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    from safetensors import safe_open

    from moeforge.wemoe.config import WEMoEConfig
    from moeforge.wemoe.families import family_named
    from moeforge.wemoe.model import build_wemoe_model, open_sources

    cfg = dict(meta["config"])
    src = meta["sources"]
    cfg["base_model"] = check_sources(src["base"], "base_model", verify)
    cfg["experts"] = [{**t, "source_model": check_sources(src["experts"][t["name"]], f"expert {t['name']}", verify)}
                      for t in cfg["experts"]]
    config = WEMoEConfig.from_dict(cfg, origin=str(out_dir / META_FILE))
    router_path = out_dir / ROUTER_FILE
    if not router_path.is_file():
        raise SourceError(f"{router_path}: missing")
    if verify and sha256_file(router_path) != meta["routers"]["sha256"]:
        raise SourceError(f"{router_path}: does not match the sha256 recorded in {META_FILE}")
    family = family_named(config.family)
    sources = open_sources(config, family)
    model = build_wemoe_model(config, family, sources)
    model.sources = sources
    try:
        with safe_open(str(router_path), framework="pt") as f:
            tensors: Dict[str, object] = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SourceError(f"{router_path}: unreadable ({type(e).__name__}: {e})") from None
    model.load_router_tensors(tensors, origin=str(router_path))
    model.attach_runtime(str(sources.base.path))
    model.batch_reduce = False
    model.eval()
    return model.to_device(_device(device))


def _device(device: Optional[str]):
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
