"""Per-layer expert choice: `sources: [{model, layers: [start, end)}, ...]` instead of `source_model`."""
import pytest
import torch
from conftest import expert_config
from helpers import read_tensors

import moeforge
from moeforge.errors import ConfigError, SourceError


def _layered(models, ranges=((0, 1), (1, 2))):
    return {"sources": [{"model": models["code"], "layers": list(ranges[0])},
                        {"model": models["story"], "layers": list(ranges[1])}],
            "positive_prompts": ["Solve for x"]}


def test_each_layer_range_comes_from_its_model(models, out):
    cfg = expert_config(models["base"], [models["base"]])
    cfg["experts"].append(_layered(models))
    moeforge.build(cfg, out, quiet=True)
    got, code, story = read_tensors(out), read_tensors(models["code"]), read_tensors(models["story"])
    for layer, src in ((0, code), (1, story)):
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            assert torch.equal(got[f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight"],
                               src[f"model.layers.{layer}.mlp.{proj}.weight"])
    assert not torch.equal(code["model.layers.1.mlp.up_proj.weight"], story["model.layers.1.mlp.up_proj.weight"])
    assert "sources:" in (out / "moeforge_config.yml").read_text()  # the recipe rebuilds the same model
    again = moeforge.build(out / "moeforge_config.yml", out.parent / "again", quiet=True)
    assert (out.parent / "again" / again.files[0]).read_bytes() == (out / again.files[0]).read_bytes()


@pytest.mark.parametrize("ranges, error, needle", [
    (((0, 1), (1, 3)), ConfigError, "experts.1.sources: layer ranges end at 3, but the base model has 2 layers"),
    (((0, 1), (2, 3)), ConfigError, "experts.1.sources: layer ranges [0, 1) and [2, 3) leave layers 1..1 without a source"),
    (((0, 2), (1, 2)), ConfigError, "experts.1.sources: layer ranges [0, 2) and [1, 2) overlap"),
])
def test_layer_ranges_must_tile_the_model(models, out, ranges, error, needle):
    cfg = expert_config(models["base"], [models["base"]])
    cfg["experts"].append(_layered(models, ranges))
    with pytest.raises(error) as e:
        moeforge.build(cfg, out, quiet=True)
    assert needle in str(e.value)
    assert not out.exists()


def test_a_layer_source_must_fit_the_base(models, out, tmp_path):
    from moeforge.toy import make_dense

    make_dense(tmp_path / "wide", intermediate_size=96)
    cfg = expert_config(models["base"], [models["base"]])
    cfg["experts"].append({"sources": [{"model": models["code"], "layers": [0, 1]},
                                       {"model": str(tmp_path / "wide"), "layers": [1, 2]}],
                           "positive_prompts": ["x"]})
    with pytest.raises(SourceError, match=r"layer 1 MLP shapes"):
        moeforge.build(cfg, out, quiet=True)
