"""PEFT LoRA adapters as experts: W' = W + scale * B @ A, applied tensor by tensor while writing."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from moeforge.errors import SourceError
from moeforge.sources.checkpoint import Checkpoint, read_json

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class LoraDelta:
    adapter: "object"  # Checkpoint over the adapter's weight files
    a: str
    b: str
    scale: float
    rows: Optional[Tuple[int, int]] = None  # the rows of a fused module's delta that one split tensor takes

    def compute(self):
        """scale * B @ A in float32."""
        b = self.adapter.load(self.b).float()
        if self.rows is not None:
            b = b[self.rows[0]:self.rows[1]]
        return (b @ self.adapter.load(self.a).float()) * self.scale


class LoraAdapter:
    def __init__(self, path: Path, label: str):
        cfg_path = Path(path) / "adapter_config.json"
        cfg = read_json(cfg_path, "a LoRA adapter needs adapter_config.json")
        for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)")):
            if cfg.get(flag):
                raise SourceError(f"{cfg_path}: {what} adapters are not supported; merge the adapter first")
        self.label = label
        self.weights = Checkpoint(Path(path), label=label)
        alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 8)
        rslora = bool(cfg.get("use_rslora"))
        pairs: Dict[str, Dict[str, str]] = {}
        for name in self.weights.tensors:
            m = _KEY.match(name)
            if m:
                pairs.setdefault(m.group("module"), {})[m.group("ab")] = name
        self.deltas: Dict[str, LoraDelta] = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise SourceError(f"{label}: adapter has lora_A or lora_B for {module} but not both")
            rank = self.weights.tensors[ab["A"]].shape[0]
            a = next((float(v) for k, v in (cfg.get("alpha_pattern") or {}).items() if module.endswith(k)), alpha)
            scale = a / (rank ** 0.5) if rslora else a / rank
            self.deltas[module + ".weight"] = LoraDelta(self.weights, ab["A"], ab["B"], scale)
        if not self.deltas:
            raise SourceError(f"{label}: adapter holds no lora_A/lora_B weights")

    def delta_for(self, name: str) -> Optional[LoraDelta]:
        return self.deltas.get(name)
