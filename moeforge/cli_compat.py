"""mergekit-moe 0.1.5's command-line options that moeforge has no option of its own for, so that its command
lines run `moeforge build` unchanged (docs/mergekit.md). They are hidden from `--help`, which names them in
one line. Those with an effect say what it is; the others do nothing, silently, except where a user would
want to know (--cuda without a GPU)."""
from __future__ import annotations

import logging
import os
import sys

import click

from moeforge.errors import ConfigError

log = logging.getLogger("moeforge")

# (click declarations, extra click keywords, what it does here): the order of mergekit-moe's --help.
_OPTIONS = [
    (("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings",), {},
     "no effect: the MoE takes the base's embeddings only"),
    (("--transformers-cache",), {"metavar": "DIR"}, "Hugging Face cache directory for downloaded models"),
    (("--lora-merge-cache",), {"metavar": "DIR"}, "no effect: LoRA experts are merged in memory, never cached"),
    (("--lora-merge-dtype",), {"metavar": "DTYPE"}, "no effect: LoRA deltas are computed in float32"),
    (("--cuda/--no-cuda",), {}, "--device cuda (unless --device is given)"),
    (("--low-cpu-memory/--no-low-cpu-memory",), {}, "no effect: tensors are streamed one at a time"),
    (("--lazy-unpickle/--no-lazy-unpickle",), {}, "no effect: .bin checkpoints are memory-mapped"),
    (("--read-to-gpu/--no-read-to-gpu",), {}, "no effect: tensors are copied, not computed on"),
    (("--multi-gpu/--no-multi-gpu",), {}, "no effect: --device auto already spreads the forward pass over GPUs"),
    (("-j", "--num-threads"), {"type": int, "metavar": "N"}, "CPU threads of torch"),
    (("--gpu-rich",), {"is_flag": True}, "as --cuda"),
    (("--async-write/--no-async-write",), {}, "no effect: the writer always overlaps reading and writing"),
    (("--write-threads",), {"type": int, "metavar": "N"}, "no effect: one writer thread"),
    (("--clone-tensors/--no-clone-tensors",), {}, "no effect: tensors are never shared between outputs"),
    (("--safe-serialization/--no-safe-serialization",), {"default": True},
     "no effect: outputs are always safetensors (--no-safe-serialization is refused)"),
]
PREFIX = "mergekit_"  # their parameter names in the command's keyword arguments


def _param_name(decls) -> str:
    long = next(d for d in decls if d.startswith("--"))
    return PREFIX + long.split("/")[0][2:].replace("-", "_")


def mergekit_compat_options(fn):
    """Add mergekit-moe's options that moeforge has none of its own for, hidden from --help."""
    for decls, kwargs, what in reversed(_OPTIONS):
        fn = click.option(*decls, _param_name(decls), hidden=True, help=what, **kwargs)(fn)
    return fn


HELP_LINE = ("mergekit-moe's options are accepted too (--cuda, --lazy-unpickle, --low-cpu-memory, -j, ...); "
             "see docs/mergekit.md.")


def apply_mergekit_options(options: dict) -> dict:
    """The build options without the mergekit-moe ones, whose effects are applied here."""
    given = {k[len(PREFIX):]: options.pop(k) for k in list(options) if k.startswith(PREFIX)}
    if given.get("safe_serialization") is False:
        raise ConfigError("--no-safe-serialization: moeforge writes safetensors only "
                          "(pickled .bin checkpoints can run code when they are loaded)")
    if given.get("transformers_cache"):
        _use_hub_cache(given["transformers_cache"])
    if given.get("num_threads"):
        import torch

        torch.set_num_threads(given["num_threads"])
    if (given.get("cuda") or given.get("gpu_rich")) and options.get("device", "auto") == "auto":
        import torch

        if torch.cuda.is_available():
            options["device"] = "cuda"
        else:
            log.warning("--cuda: no CUDA device is available; the base model runs on the CPU")
    return options


def _use_hub_cache(path: str) -> None:
    """Downloads and cache look-ups go to `path`, as mergekit's cache_dir does."""
    os.environ["HF_HUB_CACHE"] = str(path)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported (embedded use): its default was read at import
        constants.HF_HUB_CACHE = str(path)
