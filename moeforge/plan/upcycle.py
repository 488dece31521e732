"""Sparse upcycling initialisations, as extra per-tensor transforms on plain expert copies.

- copies (Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is the dense MLP; only the router is new.
- noise_scale: Gaussian noise per expert (mergekit-moe's option), seeded per tensor.
- Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): per layer and expert, a share r of the
  intermediate neurons (rows of gate/up, columns of down; a different random set per expert) is re-drawn
  from N(mean, std) of the weight matrix it belongs to.
- fine-grained experts (Qwen1.5-MoE's upcycling; NVIDIA arXiv 2410.07524's "virtual group" router init):
  each dense MLP is split into g segments along the intermediate dimension, giving g*N experts of size I/g,
  top-k becomes k*g, down_proj is scaled by g, and each copy's g router rows are equal, so whenever the
  g segments of one copy are selected with equal weights their sum is that copy's dense MLP.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from moeforge.errors import ConfigError
from moeforge.plan.tensors import Part, Reinit

if TYPE_CHECKING:
    from moeforge.pipeline.inputs import Inputs

_NEURON_DIM = {"gate": 0, "up": 0, "down": 1}  # where one intermediate neuron lives in each matrix


def check_granularity(intermediate: int, granularity: int) -> None:
    if intermediate % granularity:
        raise ConfigError(
            f"upcycle.granularity: {granularity} does not divide the intermediate size {intermediate}"
        )


def expert_extras(inputs: "Inputs", index: int, layer: int, role: str, intermediate: int) -> dict:
    """FromSource extras (part, reinit, scale) for routed expert `index` = copy * g + segment."""
    up = inputs.config.upcycle
    g = up.granularity
    segment = index % g
    size = intermediate // g
    dim = _NEURON_DIM[role]
    extras: dict = {}
    if g > 1:
        extras["part"] = Part(dim, segment * size, (segment + 1) * size)
        if role == "down":
            extras["scale"] = float(g)
    if up.drop_ratio > 0:
        extras["reinit"] = Reinit(dim, dropped_neurons(inputs.seed, layer, index, size, up.drop_ratio),
                                  _seed(inputs.seed, f"reinit:{layer}:{index}:{role}"))
    return extras


def dropped_neurons(seed: int, layer: int, expert: int, size: int, ratio: float):
    """The same neurons for gate, up and down of one expert in one layer; different per expert."""
    import torch

    gen = torch.Generator().manual_seed(_seed(seed, f"drop:{layer}:{expert}"))
    count = round(ratio * size)
    return tuple(sorted(torch.randperm(size, generator=gen)[:count].tolist()))


def _seed(seed: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{what}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
