"""Tiny local models shared by the tests: made once per session, never downloaded."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CODE = ["def add(a, b): return a + b", "Write a Python function that sorts a list"]
STORY = ["Once upon a time there was a dragon", "The knight rode into the forest"]


@pytest.fixture(scope="session", autouse=True)
def _hash_cache_dir(tmp_path_factory):
    """Builds remember source hashes in a cache of this session's own, never the user's."""
    os.environ["MOEFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    from moeforge.toy import make_dense

    root = tmp_path_factory.mktemp("models")
    paths = {name: root / name for name in ("base", "code", "story", "base_sharded", "base_bin", "mistral")}
    make_dense(paths["base"], seed=0)
    make_dense(paths["code"], init_from=paths["base"], train_texts=CODE, train_steps=4)
    make_dense(paths["story"], init_from=paths["base"], train_texts=STORY, train_steps=4)
    make_dense(paths["base_sharded"], seed=0, max_shard_size="40KB")
    make_dense(paths["base_bin"], seed=0, bin_format=True)
    make_dense(paths["mistral"], family="mistral", seed=1, sliding_window=None)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory):
    from moeforge.toy import make_dense

    root = tmp_path_factory.mktemp("qwen")
    paths = {f: root / f for f in ("qwen2", "qwen3")}
    for family, path in paths.items():
        make_dense(path, family=family, seed=3)
    return {k: str(v) for k, v in paths.items()}


def expert_config(base, experts, gate_mode="hidden", **extra):
    prompts = [CODE, STORY, ["Solve for x"], ["Das ist ein Satz"]]
    return {
        "base_model": base,
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts": [
            {"source_model": e, "positive_prompts": prompts[i % len(prompts)] + ([str(i)] if i >= len(prompts) else [])}
            for i, e in enumerate(experts)
        ],
        **extra,
    }


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"
