"""An existing MoE checkpoint read as a source: tensor names mapped back through its layout's templates."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Dict, Optional, Set

from moeforge.errors import SourceError
from moeforge.families.base import MLP_ROLES
from moeforge.sources.checkpoint import Checkpoint


class MoECheckpoint:
    """A checkpoint in one of the output layouts: which tensors are routers, routed experts and the shared
    expert, and which are the rest (attention, norms, embeddings)."""

    def __init__(self, path: Path):
        from moeforge.layouts import LAYOUTS, layout_of_config

        self.ckpt = Checkpoint(Path(path))
        self.path = self.ckpt.path
        config = self.ckpt.config
        arch = (config.get("architectures") or [None])[0]
        model_type = config.get("model_type")
        self.layout = layout_of_config(config)
        if self.layout is None:
            known = ", ".join(a for l in LAYOUTS for a in l.architectures)
            raise SourceError(f"{self.path / 'config.json'}: {arch or model_type!r} is not an MoE layout moeforge "
                              f"reads ({known})")
        self.num_layers = self._int("num_hidden_layers")
        self.hidden_size = self._int("hidden_size")
        self.shape = self.layout.shape_of(config)
        self.num_experts = self.shape.num_experts
        if self.num_experts < 1:
            raise SourceError(f"{self.path / 'config.json'}: needs an integer "
                              f"{' or '.join(self.layout.expert_count_keys())}")
        if self.layout.packed:
            self.ckpt.add_view(functools.partial(unpack, self.layout, self.num_layers, self.num_experts))
        self._moe_names: Set[str] = set()
        for layer in range(self.num_layers):
            names = [self.layout.router_name(layer)] + [
                self.layout.expert_name(role, layer, e) for e in range(self.num_experts) for role in MLP_ROLES]
            for name in names:
                if name not in self.ckpt.tensors:
                    raise SourceError(f"{self.path}: has no tensor {name!r} (layer {layer} is not an MoE layer of "
                                      f"{self.num_experts} experts in the {self.layout.name} layout)")
            self._moe_names.update(names)
            self._moe_names.update(n for n in self.shared_names(layer).values() if n in self.ckpt.tensors)
        self.intermediate_size = self.ckpt.ref(self.layout.expert_name("gate", 0, 0)).shape[0]

    def _int(self, key: str) -> int:
        value = self.ckpt.config_value(key)
        if not isinstance(value, int):
            raise SourceError(f"{self.path / 'config.json'}: needs an integer {key}")
        return value

    def shared_names(self, layer: int) -> Dict[str, str]:
        """role (and "router") -> the shared expert's tensor names in this layout, if it has one."""
        names = {role: t.format(layer=layer) for role, t in (self.layout.shared_expert or {}).items()}
        if self.layout.shared_router:
            names["router"] = self.layout.shared_router.format(layer=layer)
        return names

    def is_moe_tensor(self, name: str) -> bool:
        return name in self._moe_names

    def expert_tensor(self, role: str, layer: int, expert: int) -> str:
        return self.layout.expert_name(role, layer, expert)

    def dense_model_type(self) -> str:
        """The dense model_type with this MoE's attention (`Layout.dense_type`)."""
        return self.layout.dense_type(self.ckpt.config)

    def saved_config_path(self) -> Optional[Path]:
        from moeforge.files import RESOLVED_CONFIG

        path = self.path / RESOLVED_CONFIG
        return path if path.is_file() else None

    def close(self) -> None:
        self.ckpt.close()


def unpack(layout, num_layers: int, num_experts: int, ckpt: Checkpoint) -> None:
    """A fused-expert checkpoint's stored tensors replaced by their members, as row views (layouts.base.Packed),
    so routed and shared experts read by the layout's member names like any other layout's."""
    tensors = dict(ckpt.tensors)
    for layer in range(num_layers):
        for packed in layout.packed:
            stored = packed.stored_name(layer)
            ref = tensors.pop(stored, None)
            if ref is None:
                if packed.per_expert:
                    raise SourceError(f"{ckpt.path}: has no tensor {stored!r} (layer {layer} is not an MoE layer of "
                                      f"the {layout.name} layout)")
                continue  # no shared expert
            members = packed.members(layout, layer, num_experts)
            expert_rows = ref.shape[1] if packed.per_expert and len(ref.shape) == 3 else None
            if packed.per_expert and (expert_rows is None or ref.shape[0] != num_experts):
                raise SourceError(f"{ckpt.path}: tensor {stored!r} has shape {list(ref.shape)}, not one slice per "
                                  f"expert for {num_experts} experts")
            total = ref.shape[0] * (expert_rows or 1)
            if total % len(members):
                raise SourceError(f"{ckpt.path}: tensor {stored!r} has {total} rows, not {len(members)} equal parts")
            rows = total // len(members)
            flat = dataclasses.replace(ref, shape=(total, *ref.shape[-1:]))
            for i, name in enumerate(members):
                tensors[name] = flat.rows(i * rows, rows)
    ckpt.tensors = tensors
