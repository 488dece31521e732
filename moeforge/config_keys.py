"""Config keys the schema does not know, sorted out before validation.

mergekit-moe ignores unknown keys, so configs in the wild carry some (a top-level `tokenizer:`, a `name:`).
A key close to a real one (`experts_per_tokens`, `gate-mode`) is a mistake whose silent loss would change the
build, so it is an error naming the key meant; any other unknown key is dropped with a warning, or is an
error where the config class (or --strict) says so. The models themselves stay `extra="forbid"`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterator, List, Optional, Tuple

NEAR_MISS_CUTOFF = 0.8  # difflib ratio: catches one or two wrong letters, not a different word


@dataclasses.dataclass(frozen=True)
class UnknownKey:
    where: str  # dotted path, as pydantic writes it: experts.1.noise_scael
    meant: Optional[str]  # the known key it is a near miss of

    def problem(self, strict: bool) -> Optional[str]:
        """The error line, or None when it is only worth a warning."""
        if self.meant:
            return f"{self.where}: unknown key; did you mean {self.meant}?"
        return f"{self.where}: unknown key" if strict else None


def near_miss(key: str, known: List[str]) -> Optional[str]:
    normal = key.strip().lower().replace("-", "_").replace(" ", "_")
    match = difflib.get_close_matches(normal, known, n=1, cutoff=NEAR_MISS_CUTOFF)
    return match[0] if match else None


def split_unknown_keys(model_class, data: Any, where: Tuple = ()) -> Tuple[Any, List[UnknownKey]]:
    """`data` without the keys `model_class` does not know (at any depth), and those keys in order."""
    if not isinstance(data, dict):
        return data, []
    fields = {(f.alias or name): f for name, f in model_class.model_fields.items()}
    kept: Dict[Any, Any] = {}
    unknown: List[UnknownKey] = []
    for key, value in data.items():
        path = where + (key,)
        if key not in fields:
            unknown.append(UnknownKey(".".join(map(str, path)), near_miss(str(key), list(fields))))
            continue
        kept[key], found = _split_value(fields[key].annotation, value, path)
        unknown.extend(found)
    return kept, unknown


def _split_value(annotation, value, path: Tuple) -> Tuple[Any, List[UnknownKey]]:
    models = list(_models_in(annotation))
    if isinstance(value, dict) and len(models) == 1:
        return split_unknown_keys(models[0], value, path)
    if isinstance(value, list) and models and typing.get_origin(_unwrap_optional(annotation)) in (list, List):
        pairs = [_split_value(typing.get_args(_unwrap_optional(annotation))[0], item, path + (i,))
                 for i, item in enumerate(value)]
        return [v for v, _ in pairs], [u for _, found in pairs for u in found]
    return value, []


def _unwrap_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def _models_in(annotation) -> Iterator[type]:
    """The pydantic model classes an annotation can hold (through Optional, Union, List)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)
