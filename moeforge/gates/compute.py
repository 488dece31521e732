"""Dispatch on gate_mode. Every mode returns float32 (layers, experts, hidden) router weights."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Sequence

from moeforge.config import Expert
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


def compute_gates(mode: str, inputs: GateInputs):
    return _MODES[mode](inputs)


def _random(inputs: GateInputs):
    import torch

    torch.manual_seed(inputs.seed)  # same draw as mergekit-moe with --random-seed
    return torch.randn((inputs.num_layers, len(inputs.experts), inputs.hidden_size))


def _uniform_random(inputs: GateInputs):
    """nn.Linear's default init, U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    import torch

    torch.manual_seed(inputs.seed)
    scale = (1.0 / inputs.hidden_size) ** 0.5
    return torch.rand((inputs.num_layers, len(inputs.experts), inputs.hidden_size)) * 2 * scale - scale


def prompt_vectors(experts: Sequence[Expert], encode: Callable[[List[str]], "object"], quiet: bool = False):
    """(layers, experts, hidden): positives minus negatives, unit-normalised per layer and expert."""
    import torch
    from tqdm.auto import tqdm

    rows = []
    for expert in tqdm(experts, desc="encoding prompts", unit="expert", disable=quiet):
        vec = encode(list(expert.positive_prompts or []))
        if expert.negative_prompts:
            vec = vec - encode(list(expert.negative_prompts))
        rows.append(vec / vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def _cheap_embed(inputs: GateInputs):
    from moeforge.gates.prompts import cheap_embedding_encoder

    return prompt_vectors(inputs.experts, cheap_embedding_encoder(inputs), inputs.options.quiet)


def _hidden(average: bool):
    def run(inputs: GateInputs):
        from moeforge.gates.prompts import HiddenStateEncoder

        with HiddenStateEncoder(inputs) as encoder:
            return prompt_vectors(inputs.experts, lambda prompts: encoder.encode(prompts, average), inputs.options.quiet)

    return run


_MODES: Dict[str, Callable] = {
    "random": _random,
    "uniform_random": _uniform_random,
    "cheap_embed": _cheap_embed,
    "hidden": _hidden(average=False),
    "hidden_last": _hidden(average=False),
    "hidden_avg": _hidden(average=True),
}


def degenerate_layers(gates, threshold: float = 5.0) -> List[int]:
    """Layers whose gate matrix is ill-conditioned (prompts too similar), as mergekit warns."""
    import torch

    if gates.shape[1] < 2:
        return []
    return [l for l in range(gates.shape[0]) if float(torch.linalg.cond(gates[l].float())) > threshold]


def describe_layers(layers: List[int], total: int) -> str:
    if len(layers) >= total:
        return "all layers"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))

