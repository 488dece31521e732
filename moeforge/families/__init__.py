"""Input families: how a dense checkpoint names its MLP tensors and which attention features it has.

Each family is a small declarative module; `family_of` picks one from config.json's model_type.
"""
from __future__ import annotations

from typing import List, Optional

from moeforge.errors import SourceError
from moeforge.families.base import Family
from moeforge.families.gemma import GEMMA, GEMMA2
from moeforge.families.llama import LLAMA
from moeforge.families.mistral import MISTRAL
from moeforge.families.phi3 import PHI3
from moeforge.families.qwen2 import QWEN2
from moeforge.families.qwen3 import QWEN3

FAMILIES: List[Family] = [LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA, GEMMA2]


def family_for_model_type(model_type) -> Optional[Family]:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of(checkpoint) -> Family:
    model_type = checkpoint.config_value("model_type")
    family = family_for_model_type(model_type)
    if family is not None:
        return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise SourceError(
        f"{checkpoint.path / 'config.json'}: model_type {model_type!r} is not a supported input family (supported: {known})"
    )


def open_dense(text: str):
    """A dense model reference opened lazily, with its family's read transform applied."""
    from moeforge.sources.open_model import open_checkpoint

    ckpt = open_checkpoint(text)
    family_of(ckpt).prepare(ckpt)
    return ckpt


__all__ = ["Family", "FAMILIES", "family_of", "family_for_model_type", "open_dense"]
