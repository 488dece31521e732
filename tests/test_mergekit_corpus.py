"""Real-world mergekit-moe config shapes build unchanged (tiny local stand-ins for the models they name).

benchmarks/compare_mergekit.py --corpus builds the same files with mergekit-moe and compares the outputs."""
import logging

import pytest
import yaml
from mergekit_corpus import corpus, expected_warnings, make_standins, names_in, substitute

import moeforge

CONFIGS = corpus()


def test_the_corpus_is_large_enough():
    assert len(CONFIGS) >= 20


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    return make_standins(tmp_path_factory.mktemp("standins"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_builds(path, standins, tmp_path, caplog):
    text = path.read_text(encoding="utf-8")
    assert names_in(text), f"{path.name} names no model of mergekit_corpus.STANDINS"
    config = tmp_path / path.name
    config.write_text(substitute(text, standins), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        result = moeforge.build(config, tmp_path / "out", quiet=True, random_seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for needle in expected_warnings(text):
        assert sum(needle in w for w in warnings) == 1, (needle, warnings)
    data = yaml.safe_load(text)
    assert result.num_experts == len(data["experts"])
    assert result.experts_per_token == int(data.get("experts_per_token", 2))
    assert (tmp_path / "out" / "config.json").exists()
