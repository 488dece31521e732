"""Every fact about a gate mode that is not its router math (gates/compute.py): one row each.

Config validation, the input checks, the planner, the plan report, the card, the editors and the CLI all ask
this table; none of them names a mode."""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple


@dataclasses.dataclass(frozen=True)
class GateMode:
    name: str
    runs_base_model: bool  # loads the base model and runs its forward pass over the prompts
    needs_prompts: bool  # every routed expert needs positive_prompts (and the base a tokenizer)
    reads_embeddings: bool  # reads the base's token embedding table
    card: str  # what the model card says about the routers

    @property
    def overlaps_writer(self) -> bool:
        """Cheap enough to compute on the helper thread while the writer copies (no base model in memory)."""
        return not self.runs_base_model

    @property
    def random(self) -> bool:
        return not self.needs_prompts


_HIDDEN_LAST = "router rows from the base model's hidden states at the last token of each expert's prompts"
_RANDOM = "train the router before use"

GATE_MODES: Dict[str, GateMode] = {m.name: m for m in (
    GateMode("hidden", True, True, False, _HIDDEN_LAST),
    GateMode("hidden_avg", True, True, False,
             "router rows from the base model's hidden states averaged over each expert's prompt tokens"),
    GateMode("hidden_last", True, True, False, _HIDDEN_LAST),
    GateMode("cheap_embed", False, True, True, "router rows from the input embeddings of each expert's prompts"),
    GateMode("random", False, False, False, f"random router rows (Gaussian): {_RANDOM}"),
    GateMode("uniform_random", False, False, False, f"random router rows (uniform): {_RANDOM}"),
    GateMode("fitted", True, True, False,
             "per-layer routers fitted to the base model's hidden states over each expert's prompt tokens"),
)}
GATE_MODE_NAMES: Tuple[str, ...] = tuple(GATE_MODES)
RANDOM_GATE_MODES: Tuple[str, ...] = tuple(n for n, m in GATE_MODES.items() if m.random)
