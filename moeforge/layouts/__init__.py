"""Output layouts, one declarative module each; `select_layout` picks one as mergekit-moe does."""
from __future__ import annotations

from typing import List, Optional

from moeforge.errors import ConfigError
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.mixtral import MIXTRAL

LAYOUTS: List[Layout] = [MIXTRAL]  # order = preference when inferring


def select_layout(architecture: Optional[str], family: str, features, num_shared: int) -> Layout:
    """The named layout (prefix match, as mergekit), or the first that accepts the inputs."""
    names = ", ".join(l.name for l in LAYOUTS)
    if architecture:
        candidates = [l for l in LAYOUTS if l.name.startswith(architecture.lower())]
        if not candidates:
            raise ConfigError(f"architecture: {architecture!r} is not an output layout (choose from {names})")
    else:
        candidates = LAYOUTS
    reasons = []
    for layout in candidates:
        why = layout.refusal(family, features) or _shared_refusal(layout, num_shared)
        if why is None:
            return layout
        reasons.append(why)
    accepting = [l.name for l in LAYOUTS if not l.refusal(family, features)]
    hint = f"; layouts that accept these inputs: {', '.join(accepting)}" if accepting else ""
    raise ConfigError(f"architecture: {'; '.join(reasons)}{hint}")


def _shared_refusal(layout: Layout, num_shared: int) -> Optional[str]:
    if num_shared > layout.max_shared_experts:
        if layout.max_shared_experts == 0:
            return f"{layout.name} has no shared experts (remove shared_experts)"
        return f"{layout.name} takes at most {layout.max_shared_experts} shared expert(s)"
    if num_shared < layout.min_shared_experts:
        return f"{layout.name} needs {layout.min_shared_experts} shared expert(s) in shared_experts"
    return None


__all__ = ["Layout", "MoEShape", "LAYOUTS", "select_layout"]
