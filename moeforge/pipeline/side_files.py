"""The files written beside the shards, for every command that writes a checkpoint: config.json, the generation
config and tokenizer, the layout's own files, the recipe and the card. The manifest comes last (writer.resume)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, List

from moeforge._version import __version__
from moeforge.files import (
    CARD,
    GENERATION_CONFIG,
    MODEL_CONFIG,
    RESOLVED_CONFIG,
    TOKENIZER_FILES,
)
from moeforge.sources.checkpoint import DTYPES

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from moeforge.config import MoEConfig
    from moeforge.layouts import Layout
    from moeforge.pipeline.inputs import Inputs

log = logging.getLogger("moeforge")


def write_model_config(out: Path, config: dict) -> None:
    (out / MODEL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copied_names(copy_tokenizer: bool) -> List[str]:
    """Files copied unaltered from the model an output's tokenizer comes from."""
    return [GENERATION_CONFIG] + (list(TOKENIZER_FILES) if copy_tokenizer else [])


def copy_tokenizer_files(src: Path, out: Path, label: str, copy_tokenizer: bool) -> None:
    """generation_config.json and (unaltered) tokenizer files from `src`."""
    copied = []
    for name in copied_names(copy_tokenizer):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    if copy_tokenizer and not any(n in copied for n in TOKENIZER_FILES):
        log.warning("%s: has no tokenizer files to copy", label)


def write_layout_files(out: Path, layout: "Layout") -> None:
    """Files the layout's readers need beside the weights (remote code, say)."""
    for name, text in layout.extra_files().items():
        (out / name).write_text(text, encoding="utf-8")


def write_recipe(out: Path, config: "MoEConfig", header: str) -> None:
    (out / RESOLVED_CONFIG).write_text(f"# {header}\n" + config.to_yaml(), encoding="utf-8")


def write_card(out: Path, card: "ModelCard") -> None:
    card.save(out / CARD)


# ---- a build's side files: (tmp_dir, inputs, plan) -> None, in order ---------------------------------------
def _model_config(out: Path, inputs: Inputs, plan) -> None:
    write_model_config(out, inputs.layout.model_config(inputs.family.output_config(inputs.base.config), plan.shape,
                                                       DTYPES[inputs.out_dtype][0]))


def recipe_header(inputs: Inputs) -> str:
    return f"moeforge {__version__}; rebuild with: moeforge build {RESOLVED_CONFIG} OUT --random-seed {inputs.seed}"


def _base_side_files(out: Path, inputs: Inputs, plan) -> None:
    copy_tokenizer_files(inputs.base.path, out, inputs.base.label, inputs.options.copy_tokenizer)
    write_layout_files(out, inputs.layout)


def _resolved_config(out: Path, inputs: Inputs, plan) -> None:
    write_recipe(out, inputs.config, recipe_header(inputs))


def _model_card(out: Path, inputs: Inputs, plan) -> None:
    if not inputs.options.write_model_card:
        return
    from moeforge.card import build_card

    write_card(out, build_card(inputs, plan, (out / RESOLVED_CONFIG).read_text(encoding="utf-8")))


SIDE_FILES = [_model_config, _base_side_files, _resolved_config, _model_card]
