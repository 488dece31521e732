"""mergekit-moe command lines run `moeforge build` unchanged: every option of mergekit-moe 0.1.5's --help
(tests/data/mergekit_moe_options.txt, checked against the real one by benchmarks/compare_mergekit.py --options)
is accepted, with the same meaning or as a documented no-op."""
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import expert_config
from helpers import read_tensors
from mergekit_corpus import checked_in_options, spellings

from moeforge.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "mergekit.md"
SAMPLE_VALUES = {"INTEGER": "1", "SIZE": "5B"}
TEXT_VALUES = {"--device": "cpu", "--lora-merge-dtype": "bfloat16"}
REFUSED = {"--no-safe-serialization": "moeforge writes safetensors only"}
NO_OPS = ["--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--async-write", "--write-threads", "4",
          "--clone-tensors", "--safe-serialization", "--unsafe-truncate-embeddings", "--lora-merge-cache", "/nowhere",
          "--lora-merge-dtype", "float16", "--no-lazy-unpickle", "--no-clone-tensors"]

ALL = [(decl, name, takes_value) for decl in checked_in_options() for name, takes_value in spellings(decl)]


@pytest.fixture
def hub_cache_and_threads(monkeypatch):
    """--transformers-cache and -j change the process: put both back."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", huggingface_hub.constants.HF_HUB_CACHE)
    monkeypatch.setenv("HF_HUB_CACHE", os.environ.get("HF_HUB_CACHE", huggingface_hub.constants.HF_HUB_CACHE))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(models, tmp_path, **kwargs):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]], **kwargs)))
    return path


def test_the_list_is_mergekit_moes():
    assert len(checked_in_options()) == 27 and "-j, --num-threads INTEGER" in checked_in_options()


@pytest.mark.parametrize("decl, name, takes_value", ALL, ids=[n for _, n, _ in ALL])
def test_every_mergekit_option_is_accepted(decl, name, takes_value, models, tmp_path, hub_cache_and_threads):
    value = []
    if takes_value:
        metavar = decl.split()[-1]
        value = [SAMPLE_VALUES.get(metavar) or TEXT_VALUES.get(name) or str(tmp_path / "dir")]
    args = ["build", str(_config(models, tmp_path, gate_mode="random")), str(tmp_path / "out"), "--dry-run", name, *value]
    r = CliRunner().invoke(cli, args)
    assert "No such option" not in r.output and "Error: " not in r.output, r.output
    if name in REFUSED:
        assert r.exit_code == 2 and REFUSED[name] in r.output, r.output
    else:
        assert r.exit_code == 0, (r.output, r.exception)


def test_no_op_options_change_nothing_and_say_nothing(models, tmp_path):
    cfg = _config(models, tmp_path, gate_mode="random")
    plain = CliRunner().invoke(cli, ["build", str(cfg), str(tmp_path / "a"), "--random-seed", "3"])
    noop = CliRunner().invoke(cli, ["build", str(cfg), str(tmp_path / "b"), "--random-seed", "3", *NO_OPS])
    assert plain.exit_code == 0 and noop.exit_code == 0, noop.output
    assert "warning" not in noop.output
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())


def test_write_model_card(models, tmp_path):
    cfg = _config(models, tmp_path, gate_mode="random")
    for flag, card in (("--write-model-card", True), ("--no-write-model-card", False)):
        out = tmp_path / flag
        r = CliRunner().invoke(cli, ["build", str(cfg), str(out), "--quiet", flag])
        assert r.exit_code == 0, r.output
        assert (out / "README.md").exists() == card
        assert (out / "moeforge_config.yml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("flag", ["--cuda", "--gpu-rich"])
def test_cuda_without_a_gpu_says_so_once(models, tmp_path, flag):
    r = CliRunner().invoke(cli, ["build", str(_config(models, tmp_path)), str(tmp_path / "out"), flag])
    assert r.exit_code == 0, r.output
    assert r.output.count("no CUDA device is available") == 1, r.output


def test_cuda_means_device_cuda():
    from moeforge.cli_compat import apply_mergekit_options

    # an explicit --device wins, as in mergekit-moe
    assert apply_mergekit_options({"mergekit_cuda": True, "device": "cpu"}) == {"device": "cpu"}
    chosen = apply_mergekit_options({"mergekit_gpu_rich": True, "device": "auto"})
    assert chosen == {"device": "cuda" if torch.cuda.is_available() else "auto"}


def test_transformers_cache_and_threads_are_honoured(models, tmp_path, hub_cache_and_threads):
    import huggingface_hub.constants

    cfg = _config(models, tmp_path, gate_mode="random")
    r = CliRunner().invoke(cli, ["build", str(cfg), str(tmp_path / "out"), "--dry-run", "--transformers-cache",
                                 str(tmp_path / "cache"), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert os.environ["HF_HUB_CACHE"] == huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / "cache")
    assert torch.get_num_threads() == 1


def test_main_help_stays_short_and_names_them():
    r = CliRunner().invoke(cli, ["build", "--help"])
    assert "--lazy-unpickle" in r.output and "docs/mergekit.md" in r.output
    assert "--read-to-gpu" not in r.output  # hidden: one line names the group


def test_docs_cover_every_option():
    text = DOCS.read_text(encoding="utf-8")
    for decl in checked_in_options():
        for name, _ in spellings(decl):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_several_problems_are_listed_one_line_each(tmp_path):
    cfg = tmp_path / "moe.yml"
    cfg.write_text("experts:\n  - source_model: a\n    positve_prompts: [x]\ngate-mode: random\n")
    r = CliRunner().invoke(cli, ["build", str(cfg), str(tmp_path / "out")])
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2
    assert lines == [
        f"moeforge: error: {cfg}: experts.0.positve_prompts: unknown key; did you mean positive_prompts?",
        f"moeforge: error: {cfg}: gate-mode: unknown key; did you mean gate_mode?",
        f"moeforge: error: {cfg}: base_model: Field required",
    ]
