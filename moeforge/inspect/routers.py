"""Find the routers of any transformers MoE and record their logits with forward hooks.

Generic on purpose: a router is the module, inside decoder layer N, whose 2-D weight is
(num_experts, hidden_size), with num_experts read from the config under any key an output layout uses
(moeforge.layouts). Its logits are recomputed from its input,
so the module's own return convention does not matter. A shared expert's one-row gate never matches.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from moeforge.errors import SourceError



def _expert_count_keys() -> Tuple[str, ...]:
    from moeforge.layouts import LAYOUTS

    return tuple(dict.fromkeys(k for l in LAYOUTS for k in l.expert_count_keys()))


EXPERT_COUNT_KEYS = _expert_count_keys()
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_shape(config) -> Tuple[int, int]:
    """(routed experts, experts per token) from a transformers config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    experts = next((get(k) for k in EXPERT_COUNT_KEYS if isinstance(get(k), int) and get(k) > 0), None)
    top_k = get("num_experts_per_tok")
    if experts is None or not isinstance(top_k, int):
        raise SourceError(
            f"config.json has no {'/'.join(EXPERT_COUNT_KEYS)} and num_experts_per_tok: not an MoE checkpoint"
        )
    return experts, top_k


def find_routers(model, num_experts: int, hidden_size: int) -> List[Tuple[int, str, object]]:
    """(layer, module name, module) for every router, in layer order."""
    import torch

    found: Dict[int, List[Tuple[str, object]]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        m = _LAYER.search(name)
        if m is None or not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_experts, hidden_size):
            continue
        found.setdefault(int(m.group(1)), []).append((name, module))
    routers = []
    for layer in sorted(found):
        candidates = found[layer]
        if len(candidates) > 1:  # prefer what is named like a router
            candidates = [c for c in candidates if re.search(r"(gate|router)$", c[0])] or candidates
        if len(candidates) != 1:
            names = ", ".join(c[0] for c in found[layer])
            raise SourceError(f"layer {layer}: cannot tell which of {names} is the router")
        routers.append((layer, *candidates[0]))
    if not routers:
        raise SourceError(f"found no router (a {num_experts} x {hidden_size} weight) in {type(model).__name__}")
    return routers


class RouterRecorder:
    """Context manager: `logits[layer]` collects (tokens, experts) float32 router logits, one entry per call."""

    def __init__(self, model, num_experts: int, hidden_size: int):
        self.routers = find_routers(model, num_experts, hidden_size)
        self.hidden_size = hidden_size
        self.logits: Dict[int, list] = {layer: [] for layer, _, _ in self.routers}
        self._hooks = []

    @property
    def layers(self) -> List[int]:
        return [layer for layer, _, _ in self.routers]

    def clear(self) -> None:
        for calls in self.logits.values():
            calls.clear()

    def __enter__(self) -> "RouterRecorder":
        import torch

        for layer, _, module in self.routers:
            def record(mod, args, kwargs, layer=layer):
                x = args[0] if args else kwargs["hidden_states"]
                x = x.reshape(-1, self.hidden_size).float()
                self.logits[layer].append(torch.nn.functional.linear(x, mod.weight.float()).cpu())

            self._hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
