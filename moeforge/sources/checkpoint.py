"""A dense checkpoint on disk, read lazily.

Safetensors headers are parsed up front so the plan knows every tensor's file and byte range; tensor data is
read only when a tensor is written (and not at all when its bytes can be copied file to file). A Hub model
can first be opened as a preview (config.json and remote safetensors headers only), so every check runs
before its weights are downloaded; `materialize()` downloads them.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from moeforge.errors import SourceError

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: Dict[str, Tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
CODE_OF = {name: code for code, (name, _) in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one source tensor lives. `start`/`end` are absolute file offsets (safetensors only).

    A view (`row0`, `stored_rows` set) is a row range of the stored tensor `name`: fused tensors split on read.
    Rows are contiguous bytes, so a view of a safetensors tensor is still one byte range; a stored 3-D tensor
    (fused experts) is viewed as 2-D, its first two dimensions merged.
    """

    file: Path
    name: str  # the name stored in the file
    dtype: str  # safetensors code, e.g. "BF16"
    shape: Tuple[int, ...]
    start: Optional[int] = None
    end: Optional[int] = None
    row0: int = 0
    stored_rows: Optional[int] = None

    def rows(self, first: int, count: int) -> "TensorRef":
        """A view of `count` rows from row `first` of this tensor."""
        if not self.shape or first < 0 or first + count > self.shape[0]:
            raise SourceError(f"{self.file}: tensor {self.name!r} has no rows {first}..{first + count}")
        row_bytes = self.nbytes // max(self.shape[0], 1)
        start = None if self.start is None else self.start + first * row_bytes
        return TensorRef(self.file, self.name, self.dtype, (count, *self.shape[1:]), start,
                         None if start is None else start + count * row_bytes, self.row0 + first,
                         self.stored_rows if self.stored_rows is not None else self.shape[0])

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def read_rows(ref: TensorRef, start: int, stop: int):
    """Rows of a safetensors tensor, read into a fresh buffer. Pages of a memory map stay mapped and count in
    RSS until the file is closed; read pages never do, so converting a large model stays small."""
    import torch

    start, stop = max(0, start), min(stop, ref.shape[0])
    row_bytes = ref.nbytes // max(ref.shape[0], 1)
    shape = (max(0, stop - start), *ref.shape[1:])
    buf = bytearray(shape[0] * row_bytes)
    view = memoryview(buf)
    try:
        with open(ref.file, "rb", buffering=0) as f:
            f.seek(ref.start + start * row_bytes)
            while view:
                got = f.readinto(view)
                if not got:
                    raise SourceError(f"{ref.file}: tensor {ref.name!r} ends early (file truncated?)")
                view = view[got:]
    except OSError as e:
        raise SourceError(f"{ref.file}: cannot read ({e.strerror or e})") from None
    if not buf:
        return torch.empty(shape, dtype=getattr(torch, DTYPES[ref.dtype][0]))
    return torch.frombuffer(buf, dtype=getattr(torch, DTYPES[ref.dtype][0])).reshape(shape)


def read_safetensors_header(path: Path) -> Dict[str, TensorRef]:
    """Parse and check one file's header: every range inside the file, no overlaps past the end."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise SourceError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(f"{path}: unreadable safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: unreadable safetensors header")
    base = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        ref = TensorRef(path, name, dtype, shape, base + s, base + e)
        if e - s != ref.nbytes or base + e > size:
            raise SourceError(
                f"{path}: tensor {name!r} byte range {s}..{e} does not match its shape or lies past the end "
                f"(file truncated?)"
            )
        refs[name] = ref
    return refs


class Checkpoint:
    """One model directory: its config.json and a lazy tensor index over safetensors or PyTorch .bin files."""

    def __init__(self, path: Path, label: Optional[str] = None, tensors: Optional[Dict[str, TensorRef]] = None,
                 fetch: Optional[Callable[[], Path]] = None):
        """`tensors` and `fetch` make a preview: shapes from remote headers, weights fetched by `materialize`."""
        self.path = Path(path)
        self.label = label or str(path)
        self._handles: dict = {}
        self.adapter = None  # a LoraAdapter whose deltas apply to this checkpoint's tensors
        self._fetch = fetch
        self._views: List[Callable[["Checkpoint"], None]] = []
        self.tensors: Dict[str, TensorRef] = tensors if tensors is not None else self._index()

    @property
    def is_preview(self) -> bool:
        return self._fetch is not None

    def add_view(self, view: Callable[["Checkpoint"], None]) -> None:
        """A read transform that rewrites `tensors` (an input family's fused tensors split into views);
        applied now and again after `materialize`."""
        self._views.append(view)
        view(self)

    def materialize(self) -> None:
        """Download a preview's weights (after every check passed) and index the local files."""
        if self._fetch is None:
            return
        self.path, self._fetch = Path(self._fetch()), None
        self.tensors = self._index()
        for view in self._views:
            view(self)

    # ---- metadata ---------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        data = read_json(cfg, "every model directory needs a config.json")
        if not isinstance(data, dict) or "model_type" not in data:
            raise SourceError(f"{cfg}: has no model_type")
        return data

    def config_value(self, key: str, default=None):
        """A config key, also looking in a nested text_config (multimodal wrappers)."""
        if key in self.config:
            return self.config[key]
        return (self.config.get("text_config") or {}).get(key, default)

    def _index(self) -> Dict[str, TensorRef]:
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: not a directory")
        st_index = self.path / "model.safetensors.index.json"
        if st_index.exists():
            files = sorted(set(_weight_map(st_index).values()))
            return self._read_safetensors([self.path / f for f in files], st_index)
        st_files = sorted(self.path.glob("*.safetensors"))
        if st_files:
            return self._read_safetensors(st_files)
        bin_index = self.path / "pytorch_model.bin.index.json"
        bin_files = (
            [self.path / f for f in sorted(set(_weight_map(bin_index).values()))]
            if bin_index.exists()
            else sorted(self.path.glob("*.bin"))
        )
        bin_files = [f for f in bin_files if f.name != "training_args.bin"]
        if not bin_files:
            raise SourceError(f"{self.path}: no weights found (*.safetensors or pytorch_model*.bin)")
        return self._read_bins(bin_files)

    def _read_safetensors(self, files, index: Optional[Path] = None) -> Dict[str, TensorRef]:
        refs: Dict[str, TensorRef] = {}
        for f in files:
            if not f.exists():
                raise SourceError(f"{f}: missing (listed in {index.name if index else 'the model directory'})")
            refs.update(read_safetensors_header(f))
        if index is not None:
            for name, fname in _weight_map(index).items():
                if name not in refs:
                    raise SourceError(f"{self.path / fname}: has no tensor {name!r} although {index.name} lists it")
        return refs

    def _read_bins(self, files) -> Dict[str, TensorRef]:
        refs = {}
        for f in files:
            for name, t in self._load_bin(f).items():
                code = CODE_OF.get(str(t.dtype).removeprefix("torch."))
                if code is None:
                    raise SourceError(f"{f}: tensor {name!r} has unsupported dtype {t.dtype}")
                refs[name] = TensorRef(f, name, code, tuple(t.shape))
        return refs

    def _load_bin(self, f: Path) -> dict:
        handle = self._handles.get(f)
        if handle is None:
            import torch

            try:  # memory-mapped, and never unpickles code
                handle = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for corrupt pickles
                raise SourceError(f"{f}: unreadable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
            if not isinstance(handle, dict):
                raise SourceError(f"{f}: does not hold a state dict")
            self._handles[f] = handle
        return handle

    # ---- tensor data ------------------------------------------------------------------------------
    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"{self.label}: missing tensor {name!r}") from None

    def load(self, name: str):
        """One tensor as a torch.Tensor (memory-mapped where the format allows)."""
        ref = self.ref(name)
        if ref.stored_rows is not None:
            return self.load_rows(name, 0, ref.shape[0])
        return self._load_stored(ref)

    def load_rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of a tensor, reading only those bytes."""
        ref = self.ref(name)
        if ref.start is not None and ref.shape:
            return read_rows(ref, start, stop)
        t = self._load_stored(ref)
        if t.dim() != len(ref.shape):  # a row view of a stored 3-D tensor seen as 2-D (fused experts)
            t = t.reshape(-1, *ref.shape[1:])
        return t if len(ref.shape) == 0 else t[ref.row0 + start:ref.row0 + min(stop, ref.shape[0])]

    def _load_stored(self, ref: TensorRef):
        if self._fetch is not None:
            raise AssertionError(f"{self.label}: tensor data read from a preview (materialize it first)")
        if ref.start is None:
            return self._load_bin(ref.file)[ref.name]
        return self._safe_open(ref.file).get_tensor(ref.name)

    def _safe_open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle

    def delta_for(self, name: str):
        return self.adapter.delta_for(name) if self.adapter is not None else None

    def close(self) -> None:
        self._handles.clear()
        if self.adapter is not None:
            self.adapter.weights.close()


def read_json(path: Path, why_needed: str):
    """A JSON file, or a one-line SourceError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: missing ({why_needed})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: unreadable ({e})") from None


def _weight_map(index: Path) -> Dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        wm = data["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError
        return wm
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise SourceError(f"{index}: unreadable index (expected a JSON object with a weight_map)") from None
