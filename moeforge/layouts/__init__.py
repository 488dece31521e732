"""Output layouts, one declarative module each; `select_layout` picks one as mergekit-moe does."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from moeforge.errors import ConfigError
from moeforge.families.base import describe_features
from moeforge.layouts.base import Layout, MoEShape
from moeforge.layouts.deepseek_moe import DEEPSEEK_MOE
from moeforge.layouts.granitemoeshared import GRANITE_MOE_SHARED
from moeforge.layouts.mixtral import MIXTRAL
from moeforge.layouts.qwen2_moe import QWEN2_MOE
from moeforge.layouts.qwen3_moe import QWEN3_MOE

# mergekit's order of preference, then layouts mergekit does not write (never inferred where those fit)
LAYOUTS: List[Layout] = [MIXTRAL, DEEPSEEK_MOE, QWEN2_MOE, QWEN3_MOE, GRANITE_MOE_SHARED]
LAYOUT_NAMES = tuple(l.name for l in LAYOUTS)  # the `architecture:` values


def layout_named(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise ConfigError(f"architecture: {name!r} is not an output layout (choose from {', '.join(l.name for l in LAYOUTS)})")


def layouts_matching(architecture: str) -> List[Layout]:
    """The layouts an `architecture:` value names: the exact name, else every prefix match (as mergekit), so
    `qwen` is Qwen2-MoE and not also Qwen3-MoE."""
    name = architecture.lower()
    return [l for l in LAYOUTS if l.name == name] or [l for l in LAYOUTS if l.name.startswith(name)]


def layout_of_config(config: dict) -> Optional[Layout]:
    """The layout a checkpoint's config.json is written in, or None."""
    return next((l for l in LAYOUTS if l.recognises(config)), None)


def _check_some_layout_fits(family: str, features) -> None:
    """Inputs no layout can express are refused with what is missing, whatever `architecture` says."""
    if any(l.refusal(family, features) is None for l in LAYOUTS):
        return
    takers = [l for l in LAYOUTS if family in l.families] or LAYOUTS
    missing = frozenset(features) - frozenset().union(*(l.features for l in takers))
    if missing:
        raise ConfigError(f"architecture: no output layout can express {family} inputs with "
                          f"{describe_features(missing)}")


def select_layout(
    architecture: Optional[str], family: str, features, shared: Sequence = (), gate_mode: str = "hidden",
    renormalize: Optional[bool] = None,
) -> Tuple[Layout, bool]:
    """The named layout (prefix match, as mergekit), or the first that accepts the inputs; and whether inferred."""
    names = ", ".join(LAYOUT_NAMES)
    _check_some_layout_fits(family, features)
    if architecture:
        candidates = layouts_matching(architecture)
        if not candidates:
            raise ConfigError(f"architecture: {architecture!r} is not an output layout (choose from {names})")
    else:
        candidates = LAYOUTS
    reasons = []
    for layout in candidates:
        why = (layout.refusal(family, features) or layout.shared_refusal(shared, gate_mode)
               or layout.renormalize_refusal(renormalize))
        if why is None:
            return layout, not architecture
        reasons.append(why)
    accepting = [l.name for l in LAYOUTS if not l.refusal(family, features)]
    hint = f"; layouts that accept these inputs: {', '.join(accepting)}" if accepting else ""
    raise ConfigError(f"architecture: {'; '.join(reasons)}{hint}")


__all__ = ["Layout", "MoEShape", "LAYOUTS", "LAYOUT_NAMES", "select_layout", "layout_named", "layout_of_config"]
