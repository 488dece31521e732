"""Model references: a local directory or a Hub id (`org/name`, `org/name@revision`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional

from moeforge.errors import SourceError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a build needs from a Hub repo (README.md: the license, for the card); skips duplicate weight formats
# where safetensors exist.
_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


def resolve_adapter(text: str) -> Optional[Path]:
    """The LoRA adapter directory of a `model+adapter` reference, or None."""
    ref = ModelRef.parse(text)
    if ref.lora is None:
        return None
    return _resolve(ModelRef.parse(ref.lora), ref.lora)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    name: str
    revision: Optional[str] = None
    lora: Optional[str] = None  # mergekit's `model+adapter` syntax

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        lora = None
        if not os.path.exists(os.path.expanduser(text)) and "+" in text:
            text, _, lora = text.rpartition("+")
        if os.path.exists(os.path.expanduser(text)) or "@" not in text:
            return cls(text, None, lora or None)
        name, _, revision = text.rpartition("@")
        return cls(name, revision or None, lora or None)

    def __str__(self) -> str:
        return self.name + (f"@{self.revision}" if self.revision else "") + (f"+{self.lora}" if self.lora else "")


def hub_id(text: str) -> Optional[str]:
    """The Hub repo id a reference names (without its revision), or None for a local directory."""
    ref = ModelRef.parse(text)
    if os.path.exists(os.path.expanduser(ref.name)) or not _HUB_ID.match(ref.name):
        return None
    return ref.name


def resolve_model(text: str) -> Path:
    """Local directory for a reference (without its adapter), using huggingface_hub's cache for Hub ids."""
    ref = ModelRef.parse(text)
    return _resolve(ref, text)


def _resolve(ref: ModelRef, text: str) -> Path:
    local = Path(os.path.expanduser(ref.name))
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"{text}: is a file; a model reference must be a directory or a Hub id")
        return local
    if not _HUB_ID.match(ref.name):
        raise SourceError(f"{text}: no such directory (and not a Hub id of the form org/name)")
    return _from_hub(ref, text)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _from_hub(ref: ModelRef, text: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _offline()
    with _hub_errors(ref, text, offline):
        path = snapshot_download(
            ref.name, revision=ref.revision, allow_patterns=_ALLOW, local_files_only=offline, etag_timeout=10
        )
        if not any(Path(path).glob("*.safetensors")):  # old repos only have PyTorch .bin weights
            path = snapshot_download(
                ref.name, revision=ref.revision, allow_patterns=_ALLOW + ["*.bin"],
                local_files_only=offline, etag_timeout=10,
            )
        return Path(path)


@dataclasses.dataclass
class Preview:
    """A Hub model before its weights are downloaded: config.json and the tensor shapes from remote headers."""

    path: Path  # the snapshot directory, holding config.json so far
    tensors: Dict[str, object]  # name -> TensorRef without byte offsets
    fetch: Callable[[], Path]  # downloads the weights of the same commit


def preview_model(text: str) -> Optional[Preview]:
    """A Preview of an online Hub reference, or None (local directories, offline cache, .bin-only repos: these
    are opened directly; for .bin-only repos that means downloading before the shape checks)."""
    from moeforge.sources.checkpoint import DTYPES, TensorRef

    ref = ModelRef.parse(text)
    if Path(os.path.expanduser(ref.name)).exists() or not _HUB_ID.match(ref.name) or _offline():
        return None
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    with _hub_errors(ref, text, offline=False):
        config = Path(hf_hub_download(ref.name, "config.json", revision=ref.revision, etag_timeout=10))
        commit = config.parent.name  # snapshots/<commit>/config.json: pin the weights to the same commit
        try:
            meta = get_safetensors_metadata(ref.name, revision=commit)
        except NotASafetensorsRepoError:
            return None
    tensors = {}
    for filename, info in meta.files_metadata.items():
        for name, t in info.tensors.items():
            if t.dtype not in DTYPES:
                raise SourceError(f"{text}: tensor {name!r} in {filename} has unsupported dtype {t.dtype}")
            tensors[name] = TensorRef(config.parent / filename, name, t.dtype, tuple(int(d) for d in t.shape))
    return Preview(config.parent, tensors, lambda: _from_hub(ModelRef(ref.name, commit), text))


@contextlib.contextmanager
def _hub_errors(ref: ModelRef, text: str, offline: bool):
    """huggingface_hub's exceptions as one-line SourceErrors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise SourceError(f"{text}: not a local directory, not in the Hugging Face cache, and {why}") from None
    except GatedRepoError:
        raise SourceError(f"{text}: gated repository; accept its terms on the Hub and log in (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceError(f"{text}: revision {ref.revision!r} not found on the Hub") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{text}: no such model on the Hub (or it is private and no token is set)") from None
    except OSError as e:
        raise SourceError(f"{text}: download failed ({e})") from None
