"""Lazy readers for dense checkpoints: configs and tensor headers up front, tensor bytes on demand."""
from moeforge.sources.checkpoint import Checkpoint, TensorRef
from moeforge.sources.resolve import ModelRef, resolve_model

__all__ = ["Checkpoint", "TensorRef", "ModelRef", "resolve_model"]
