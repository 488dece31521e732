"""Build options: the CLI flags, also usable from Python as keyword arguments of `moeforge.build`."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from moeforge.errors import ConfigError

DEFAULT_SHARD_SIZE = "5B"


@dataclasses.dataclass
class BuildOptions:
    random_seed: Optional[int] = None
    out_shard_size: str = DEFAULT_SHARD_SIZE
    copy_tokenizer: bool = True
    write_model_card: bool = True  # README.md
    strict: bool = False  # every unknown config key is an error (default: a warning)
    device: str = "auto"
    trust_remote_code: bool = False
    allow_all_same: bool = False  # --i-understand-this-is-not-useful-without-training
    allow_crimes: bool = False  # mix input families
    hidden_dtype: str = "bfloat16"  # dtype of the base model's forward pass for hidden gates (mergekit: bf16)
    load_in_4bit: bool = False  # bitsandbytes quantization of that forward pass (moeforge[quant])
    load_in_8bit: bool = False
    prompt_batch_size: int = 16
    overwrite: bool = False
    resume: bool = False  # reuse the completed shards of an interrupted build of the same inputs
    hash_sources: bool = True  # sha256 of every source file in the manifest (off: size and mtime only)
    check_finite: bool = True  # stop on NaN/Inf in any source tensor, checked in the sha256 pass (checks/finite.py)
    quiet: bool = False
    verbose: bool = False
    push_to_hub: Optional[str] = None  # org/name: upload OUT after a successful build
    private: bool = False  # with push_to_hub: create the repo private

    @classmethod
    def from_kwargs(cls, **kwargs) -> "BuildOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown build option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbgt]?)(i?b)?\s*$", re.IGNORECASE)
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_shard_size(value, bytes_per_param: int) -> int:
    """'5B' / '500M' (parameters, as mergekit) or '4GB' / '4GiB' / a plain byte count -> bytes."""
    text = str(value)
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--out-shard-size: {text!r} is not a size (examples: 5B parameters, 4GB, 4GiB, 1000000)")
    number, prefix, byte_suffix = float(m.group(1)), m.group(2).lower(), (m.group(3) or "").lower()
    if byte_suffix == "ib":
        size = number * 1024 ** ("kmgt".index(prefix) + 1) if prefix in "kmgt" and prefix else None
        if size is None:
            raise ConfigError(f"--out-shard-size: {text!r} is not a size")
    elif byte_suffix == "b" or (prefix == "" and not byte_suffix):
        size = number * _DECIMAL[prefix]  # bytes
    else:
        size = number * _DECIMAL[prefix] * bytes_per_param  # a parameter count, like mergekit's 5B
    if size < 1:
        raise ConfigError(f"--out-shard-size: {text!r} must be positive")
    return int(size)
