"""Model references (`dir`, `org/name@rev`, `model+adapter`) opened as checkpoints: above checkpoint.py,
lora.py and resolve.py, which it puts together."""
from __future__ import annotations

from moeforge.sources.checkpoint import Checkpoint
from moeforge.sources.lora import LoraAdapter
from moeforge.sources.resolve import preview_model, resolve_adapter, resolve_model


def open_checkpoint(text: str) -> Checkpoint:
    """A model reference (`dir`, `org/name@rev`, `model+adapter`) opened lazily: a Hub model (online) as a
    preview whose weights are downloaded by `materialize()`."""
    preview = preview_model(text)
    if preview is not None:
        ckpt = Checkpoint(preview.path, label=text, tensors=preview.tensors, fetch=preview.fetch)
    else:
        ckpt = Checkpoint(resolve_model(text), label=text)
    adapter_dir = resolve_adapter(text)
    if adapter_dir is not None:
        ckpt.adapter = LoraAdapter(adapter_dir, label=text)
    return ckpt


