"""The files written beside the shards: config.json, generation config and tokenizer, recipe, card."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from moeforge._version import __version__
from moeforge.files import CARD, GENERATION_CONFIG, MODEL_CONFIG, RESOLVED_CONFIG, TOKENIZER_FILES
from moeforge.sources.checkpoint import DTYPES

if TYPE_CHECKING:
    from moeforge.pipeline.inputs import Inputs

log = logging.getLogger("moeforge")


def _model_config(out: Path, inputs: Inputs, plan) -> None:
    config = inputs.layout.model_config(inputs.family.output_config(inputs.base.config), plan.shape,
                                        DTYPES[inputs.out_dtype][0])
    (out / MODEL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _resolved_config_text(inputs: Inputs) -> str:
    return (
        f"# moeforge {__version__}; rebuild with: moeforge build {RESOLVED_CONFIG} OUT --random-seed {inputs.seed}\n"
        + inputs.config.to_yaml()
    )


def _resolved_config(out: Path, inputs: Inputs, plan) -> None:
    (out / RESOLVED_CONFIG).write_text(_resolved_config_text(inputs), encoding="utf-8")


def _model_card(out: Path, inputs: Inputs, plan) -> None:
    from moeforge.card import build_card

    build_card(inputs, plan, _resolved_config_text(inputs), RESOLVED_CONFIG).save(out / CARD)


def _base_side_files(out: Path, inputs: Inputs, plan) -> None:
    """generation_config.json and (unaltered) tokenizer files from the base."""
    base, copy_tokenizer = inputs.base, inputs.options.copy_tokenizer
    names = [GENERATION_CONFIG] + (list(TOKENIZER_FILES) if copy_tokenizer else [])
    copied = []
    for name in names:
        src = base.path / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    if copy_tokenizer and not any(n in copied for n in TOKENIZER_FILES):
        log.warning("%s: has no tokenizer files to copy", base.label)


# Files written beside the shards, in order: (tmp_dir, inputs, plan) -> None.
SIDE_FILES = [_model_config, _base_side_files, _resolved_config, _model_card]


