"""Read `--prompts`: a .txt file (one prompt per line) or .jsonl (strings, or objects with text/prompt and an
optional expert, the index or name of the expert the prompt should go to)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

from moeforge.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    expert: Optional[Union[int, str]] = None  # as written in the file; resolved by `resolve_labels`
    where: str = ""  # file:line, for error messages


def read_prompts(path: Union[str, Path]) -> List[Prompt]:
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"--prompts: {path}: expected a .txt (one prompt per line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--prompts: {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts: {path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        prompts.append(_jsonl_prompt(line, where) if path.suffix == ".jsonl" else Prompt(line, None, where))
    if not prompts:
        raise ConfigError(f"--prompts: {path}: has no prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> Prompt:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(item, str):
        return Prompt(item, None, where)
    if isinstance(item, dict):
        text = item.get("text", item.get("prompt"))
        expert = item.get("expert")
        if isinstance(text, str) and (expert is None or isinstance(expert, (int, str))) and not isinstance(expert, bool):
            return Prompt(text, expert, where)
    raise ConfigError(f'{where}: expected a JSON string or an object with "text" (and optionally "expert")')


def resolve_labels(prompts: Sequence[Prompt], names: Sequence[str], sources: Sequence[str]) -> List[Optional[int]]:
    """Each prompt's expert label as an index: an integer, a display name or a source_model."""
    labels = []
    for p in prompts:
        if p.expert is None:
            labels.append(None)
        elif isinstance(p.expert, int) and 0 <= p.expert < len(names):
            labels.append(p.expert)
        elif isinstance(p.expert, str) and p.expert in names:
            labels.append(list(names).index(p.expert))
        elif isinstance(p.expert, str) and p.expert in sources:
            labels.append(list(sources).index(p.expert))
        else:
            known = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
            raise ConfigError(f"{p.where}: expert {p.expert!r} is not one of {known}")
    return labels
