"""Per-task inputs: an image folder, a dataset saved with `datasets.save_to_disk`, or a .txt/.jsonl of texts.

Batches are drawn from a seeded, epoch-wise shuffled stream addressed by step number, so a resumed run
sees exactly the batches an uninterrupted one would have, on any number of processes.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import List, Optional, Sequence

from moeforge.errors import ConfigError, MoeforgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class TaskData:
    """Raw inputs of one task, with labels where known (class indices, or None for plain texts)."""

    def __init__(self, name: str, kind: str, items: Sequence, labels: Optional[Sequence[Optional[int]]],
                 loader=None):
        self.name, self.kind, self.items = name, kind, items
        self.labels = labels
        self._loader = loader  # turns a stored item into an input (opens image files)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if self._loader is not None:
            item = self._loader(item)
        return item, (self.labels[i] if self.labels is not None else None)


def load_task_data(task, kind: str, where: str, data: Optional[str] = None) -> TaskData:
    """`kind` is "images" (needs task.classes) or "texts"; `where` names the config field in errors."""
    path = Path(data or task.data).expanduser()
    if not path.exists():
        raise ConfigError(f"{where}: {path}: no such file or directory")
    if path.is_dir() and _is_saved_dataset(path):
        out = _from_saved_dataset(task, kind, path, where)
    elif kind == "images":
        if not path.is_dir():
            raise ConfigError(f"{where}: {path}: image data must be a folder with one subfolder per class, "
                              "or a dataset saved with datasets.save_to_disk")
        out = _from_image_folder(task, path, where)
    else:
        out = _from_text_file(task, path, where)
    if len(out) == 0:
        raise ConfigError(f"{where}: {path}: holds no {kind}")
    return out


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_image_folder(task, path: Path, where: str) -> TaskData:
    classes = list(task.classes)
    items: List[Path] = []
    labels: List[int] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if sub.name not in classes:
            raise ConfigError(f"{where}: {sub}: subfolder {sub.name!r} is not one of the task's classes {classes}")
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        items += files
        labels += [classes.index(sub.name)] * len(files)
    return TaskData(task.name, "images", items, labels, loader=_open_image)


def _open_image(path: Path):
    Image = _pil()
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise MoeforgeError(f"{path}: unreadable image ({e})") from None


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MoeforgeError("reading images needs Pillow: pip install 'moeforge[wemoe]'") from None
    return Image


def _from_saved_dataset(task, kind: str, path: Path, where: str) -> TaskData:
    try:
        import datasets
    except ImportError:
        raise MoeforgeError(f"{where}: {path} is a saved dataset; reading it needs `datasets`: "
                            "pip install 'moeforge[wemoe]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a broken directory
        raise ConfigError(f"{where}: {path}: cannot load the saved dataset ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "test" in ds:
            ds = ds["test"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise ConfigError(f"{where}: {path}: has splits {splits} but no 'test'; save the split to use on its own")
    features = ds.features
    label_col = _column(features, ("label", "labels"), lambda f: isinstance(f, datasets.ClassLabel))
    if kind == "texts":
        col = _column(features, ("text",), lambda f: getattr(f, "dtype", None) == "string")
        if col is None:
            raise ConfigError(f"{where}: {path}: has no text column (columns: {list(features)})")
        return TaskData(task.name, "texts", list(ds[col]), None)
    col = _column(features, ("image", "img"), lambda f: isinstance(f, datasets.Image))
    if col is None:
        raise ConfigError(f"{where}: {path}: has no image column (columns: {list(features)})")
    labels = None
    if label_col is not None:
        labels = list(ds[label_col])
        bad = [v for v in set(labels) if not isinstance(v, int) or not 0 <= v < len(task.classes)]
        if bad:
            raise ConfigError(f"{where}: {path}: label {bad[0]!r} is not an index into the task's "
                              f"{len(task.classes)} classes")
    images = ds.select_columns([col])
    return TaskData(task.name, "images", _Column(images, col), labels, loader=_to_rgb)


class _Column:
    """Lazy, indexable view of one column (images decode only when a batch needs them)."""

    def __init__(self, ds, col: str):
        self.ds, self.col = ds, col

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.col]


def _to_rgb(img):
    return img.convert("RGB") if hasattr(img, "convert") else img


def _column(features, names, is_kind) -> Optional[str]:
    for name, feat in features.items():
        if is_kind(feat):
            return name
    for name in names:
        if name in features:
            return name
    return None


def _from_text_file(task, path: Path, where: str) -> TaskData:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: {path}:{n}: not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ConfigError(f"{where}: {path}:{n}: expected an object with a string 'text'")
            texts.append(obj["text"])
    elif path.suffix.lower() == ".txt":
        texts = [line for line in lines if line.strip()]
    else:
        raise ConfigError(f"{where}: {path}: text data must be a .txt (one text per line) or .jsonl "
                          "file, or a dataset saved with datasets.save_to_disk")
    return TaskData(task.name, "texts", texts, None)


# ---- deterministic batches ------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, task: str, epoch: int):
    import torch

    digest = hashlib.sha256(f"{seed}:{task}:{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(n, generator=gen).tolist()


def batch_indices(n: int, batch_size: int, step: int, seed: int, task: str, rank: int = 0, world: int = 1) -> List[int]:
    """Indices of the batch that process `rank` of `world` uses at `step`: consecutive slices of an endless,
    epoch-wise reshuffled stream over the task's n items."""
    start = (step * world + rank) * batch_size
    out = []
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n)
        out.append(_permutation(n, seed, task, epoch)[pos])
    return out


class StepBatches:
    """A batch sampler for DataLoader: the batches of steps start, start+1, ... (endless)."""

    def __init__(self, n: int, batch_size: int, start: int, seed: int, task: str, rank: int = 0, world: int = 1):
        self.args = (n, batch_size, seed, task, rank, world)
        self.start = start

    def __iter__(self):
        n, bs, seed, task, rank, world = self.args
        step = self.start
        while True:
            yield batch_indices(n, bs, step, seed, task, rank, world)
            step += 1


def step_loader(data: TaskData, collate, batch_size: int, start: int, seed: int, rank: int, world: int,
                num_workers: int = 0):
    from torch.utils.data import DataLoader

    sampler = StepBatches(len(data), batch_size, start, seed, data.name, rank, world)
    return iter(DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers))


def sequential_batches(data: TaskData, collate, batch_size: int, limit: Optional[int] = None):
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        yield collate([data[i] for i in range(start, min(n, start + batch_size))])
