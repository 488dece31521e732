"""Dispatch on gate_mode. Every mode returns float32 (layers, experts, hidden) router weights."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

from moeforge.config import Expert
from moeforge.errors import SourceError
from moeforge.gates.degenerate import warn_degenerate
from moeforge.options import BuildOptions
from moeforge.sources.checkpoint import Checkpoint


@dataclasses.dataclass
class GateInputs:
    base: Checkpoint
    experts: Sequence[Expert]  # experts that need a router row (routed ones, then gated shared ones)
    num_layers: int
    hidden_size: int
    seed: int
    options: BuildOptions
    embed_name: str = "model.embed_tokens.weight"
    num_routed: Optional[int] = None  # rows from here on are shared-expert gates (sigmoid); None: all routed
    checkpoints: Optional[Sequence[Checkpoint]] = None  # the experts' own, parallel to `experts` (fitted uses them)

    @property
    def routed_count(self) -> int:
        return len(self.experts) if self.num_routed is None else self.num_routed


def compute_gates(mode: str, inputs: GateInputs):
    """Router rows for every expert in `inputs.experts`; warns when the routed ones cannot tell experts apart."""
    gates, prompt_vectors = _MODES[mode](inputs)
    if prompt_vectors is not None:
        n = inputs.routed_count
        names = [e.source_model for e in inputs.experts[:n]]
        # fitted rows are not prompt vectors: mergekit's condition-number test does not apply to them
        warn_degenerate(prompt_vectors[:, :n], names, check_condition=mode != "fitted")
    return gates


def _random(inputs: GateInputs):
    import torch

    torch.manual_seed(inputs.seed)  # same draw as mergekit-moe with --random-seed
    return torch.randn((inputs.num_layers, len(inputs.experts), inputs.hidden_size)), None


def _uniform_random(inputs: GateInputs):
    """nn.Linear's default init, U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    import torch

    torch.manual_seed(inputs.seed)
    scale = (1.0 / inputs.hidden_size) ** 0.5
    return torch.rand((inputs.num_layers, len(inputs.experts), inputs.hidden_size)) * 2 * scale - scale, None


def prompt_vectors(experts: Sequence[Expert], encode: Callable[[List[str]], "object"]):
    """(layers, experts, hidden): positives minus negatives, unit-normalised per layer and expert."""
    import torch

    rows = []
    for expert in experts:
        vec = encode(list(expert.positive_prompts or []))
        if expert.negative_prompts:
            vec = vec - encode(list(expert.negative_prompts))
        rows.append(vec / vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def _cheap_embed(inputs: GateInputs):
    from moeforge.gates.prompts import cheap_embedding_encoder

    gates = prompt_vectors(inputs.experts, cheap_embedding_encoder(inputs))
    return gates, gates


def _hidden(average: bool):
    def run(inputs: GateInputs):
        import torch

        from moeforge.gates.base_model import BaseModel
        from moeforge.gates.fitted import prompt_table

        prompts = prompt_table(inputs.experts)[0]
        with BaseModel(inputs) as base:  # one batched pass over every expert's prompts
            states = dict(zip(prompts, base.prompt_states(prompts, average)))

        def encode(ps: List[str]):
            found = [states[p] for p in ps if states[p] is not None]
            if not found:
                raise SourceError(f"prompts {ps!r}: none has a token (the base's tokenizer has no bos token)")
            return torch.stack(found).mean(0)

        gates = prompt_vectors(inputs.experts, encode)
        return gates, gates

    return run


def _fitted(inputs: GateInputs):
    from moeforge.gates.fitted import fitted_gates

    return fitted_gates(inputs)


_MODES: Dict[str, Callable] = {
    "random": _random,
    "uniform_random": _uniform_random,
    "cheap_embed": _cheap_embed,
    "hidden": _hidden(average=False),
    "hidden_last": _hidden(average=False),
    "hidden_avg": _hidden(average=True),
    "fitted": _fitted,
}
