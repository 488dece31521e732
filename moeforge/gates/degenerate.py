"""Warnings for routers that cannot tell experts apart: ill-conditioned gate matrices, near-duplicate prompts."""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

log = logging.getLogger("moeforge")

CONDITION_LIMIT = 5.0  # mergekit-moe's threshold
DUPLICATE_COSINE = 0.99


def degenerate_layers(gates, threshold: float = CONDITION_LIMIT) -> List[int]:
    """Layers whose (layers, experts, hidden) matrix is ill-conditioned (prompts too similar), as mergekit warns."""
    import torch

    if gates.shape[1] < 2:
        return []
    return [l for l in range(gates.shape[0]) if float(torch.linalg.cond(gates[l].float())) > threshold]


def near_duplicates(vectors, threshold: float = DUPLICATE_COSINE) -> Dict[Tuple[int, int], List[int]]:
    """(expert e, expert f) -> layers where their prompt vectors have cosine above `threshold`."""
    import torch

    unit = vectors.float() / vectors.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos = unit @ unit.transpose(1, 2)  # (layers, experts, experts)
    pairs: Dict[Tuple[int, int], List[int]] = {}
    n = vectors.shape[1]
    for e in range(n):
        for f in range(e + 1, n):
            layers = torch.nonzero(cos[:, e, f] > threshold)[:, 0].tolist()
            if layers:
                pairs[(e, f)] = layers
    return pairs


def describe_layers(layers: List[int], total: int) -> str:
    if len(layers) >= total:
        return "all layers"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


def warn_degenerate(vectors, names: Sequence[str], check_condition: bool = True) -> None:
    """Log what makes these prompt vectors (layers, experts, hidden) a poor router, naming layers and experts."""
    n_layers = vectors.shape[0]
    if check_condition:
        bad = degenerate_layers(vectors)
        if bad:
            log.warning(
                "%s %s degenerate routing parameters (ill-conditioned gate matrix): your prompts may be too "
                "similar, and some experts will be underused", describe_layers(bad, n_layers).capitalize(),
                "has" if len(bad) == 1 else "have",
            )
    for (e, f), layers in near_duplicates(vectors).items():
        log.warning(
            "experts %d (%s) and %d (%s) have near-duplicate prompts (prompt vectors with cosine > %s at %s): "
            "the router will barely tell them apart; give each expert prompts of its own",
            e, names[e], f, names[f], DUPLICATE_COSINE, describe_layers(layers, n_layers),
        )
