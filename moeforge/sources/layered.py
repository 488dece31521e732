"""An expert whose MLPs come from different models by layer range, seen by the plan as one checkpoint."""
from __future__ import annotations

from typing import Dict, List, Tuple

from moeforge.errors import SourceError
from moeforge.families.base import layer_of


class LayeredSource:
    """Layer-indexed tensors dispatch to the checkpoint that owns that layer; the rest of the interface is the
    first part's (config, family). Parts are owned and closed by whoever opened them."""

    def __init__(self, label: str, parts: List[Tuple[Tuple[int, int], object]]):
        self.label = label
        self.parts = parts
        self.path = parts[0][1].path
        self.tensors: Dict[str, object] = {}
        for (start, end), ckpt in parts:
            for name, ref in ckpt.tensors.items():
                layer = layer_of(name)
                if layer is not None and start <= layer < end:
                    self.tensors[name] = ref

    @property
    def config(self) -> dict:
        return self.parts[0][1].config

    def config_value(self, key: str, default=None):
        return self.parts[0][1].config_value(key, default)

    def owner(self, name: str):
        layer = layer_of(name)
        for (start, end), ckpt in self.parts:
            if layer is not None and start <= layer < end:
                return ckpt
        raise SourceError(f"{self.label}: no source for tensor {name!r}")

    def ref(self, name: str):
        return self.owner(name).ref(name)

    def load(self, name: str):
        return self.owner(name).load(name)

    def load_rows(self, name: str, start: int, stop: int):
        return self.owner(name).load_rows(name, start, stop)

    def delta_for(self, name: str):
        return self.owner(name).delta_for(name)

    def close(self) -> None:
        pass
