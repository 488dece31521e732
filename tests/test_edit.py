"""Editing existing MoEs: `add-expert` appends an expert and its router row; `extract` gives back a dense model."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors
from test_cli import _assert_clean_failure, run

import moeforge
from moeforge.edit import add_expert, extract_expert
from moeforge.errors import ConfigError, SourceError


@pytest.fixture(scope="module")
def moe(models, tmp_path_factory):
    """A Mixtral of [code, base], with exact (float32) hidden gates."""
    out = tmp_path_factory.mktemp("moe") / "moe"
    moeforge.build(expert_config(models["base"], [models["code"], models["base"]]), out, quiet=True,
                   hidden_dtype="float32")
    return out


def _assert_current(out, layout):
    """An edited output has a manifest of its own files (verify passes) and no stale side file."""
    from moeforge.verify import verify
    from moeforge.writer.manifest import MANIFEST

    report = verify(out)
    assert report.ok, report.problems
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["layout"] == layout
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}


def test_extract_round_trip(models, moe, tmp_path):
    """Expert 1 is the base: extracting it gives the base back, every tensor bit for bit, loading cleanly."""
    from transformers import LlamaForCausalLM

    extract_expert(moe, 1, tmp_path / "base_again", quiet=True)
    got, base = read_tensors(tmp_path / "base_again"), read_tensors(models["base"])
    assert got.keys() == base.keys()
    assert all(torch.equal(got[k], base[k]) for k in base)
    _, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "base_again"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (logits(tmp_path / "base_again") - logits(models["base"])).abs().max() == 0
    config = json.loads((tmp_path / "base_again" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 64 and "num_local_experts" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0  # transformers 4.x and 5.x
    assert (tmp_path / "base_again" / "tokenizer.json").exists()
    _assert_current(tmp_path / "base_again", layout="llama")
    card = (tmp_path / "base_again" / "README.md").read_text()
    assert "expert 1" in card and "A dense **llama** model" in card and "experts |" not in card
    assert not (tmp_path / "base_again" / "moeforge_config.yml").exists()

    extract_expert(moe, 0, tmp_path / "code_again", quiet=True)
    code = read_tensors(models["code"])
    mlp = {k: v for k, v in read_tensors(tmp_path / "code_again").items() if ".mlp." in k}
    assert mlp.keys() == {k for k in code if ".mlp." in k}
    assert all(torch.equal(v, code[k]) for k, v in mlp.items())


def test_extract_from_qwen2_moe_is_a_qwen2_model(models, out, tmp_path):
    from transformers import Qwen2ForCausalLM

    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random", architecture="qwen",
                        shared_experts=[{"source_model": models["base"], "positive_prompts": ["x"]}])
    moeforge.build(cfg, out, quiet=True)
    extract_expert(out, 1, tmp_path / "story", quiet=True)
    _, info = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "story"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got, story = read_tensors(tmp_path / "story"), read_tensors(models["story"])
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], story["model.layers.1.mlp.down_proj.weight"])
    assert torch.count_nonzero(got["model.layers.0.self_attn.q_proj.bias"]) == 0  # the zero biases, kept


def test_add_expert_equals_building_with_it(models, moe, tmp_path):
    """The router row comes from the recorded gate mode and base: the result is the build of the recorded
    recipe, bit for bit except router rows, which batched forward passes over a different set of prompts
    reproduce to float32 rounding."""
    result = add_expert(moe, models["story"], prompts=["Once upon a time"], out_dir=tmp_path / "three",
                        quiet=True, hidden_dtype="float32")
    assert result.out_dir == tmp_path / "three"
    config = json.loads((tmp_path / "three" / "config.json").read_text())
    assert config["num_local_experts"] == 3
    recipe = moeforge.MoEConfig.from_yaml(tmp_path / "three" / "moeforge_config.yml")
    assert [e.source_model for e in recipe.experts] == [models["code"], models["base"], models["story"]]
    moeforge.build(recipe, tmp_path / "rebuilt", quiet=True, hidden_dtype="float32")
    got, rebuilt = read_tensors(tmp_path / "three"), read_tensors(tmp_path / "rebuilt")
    assert got.keys() == rebuilt.keys()
    routers = {k for k in got if k.endswith("block_sparse_moe.gate.weight")}
    assert all(torch.equal(got[k], rebuilt[k]) for k in set(got) - routers)
    assert all(torch.allclose(got[k], rebuilt[k], atol=1e-6, rtol=0) for k in routers)
    assert torch.equal(got["model.layers.0.block_sparse_moe.gate.weight"][:2],
                       read_tensors(moe)["model.layers.0.block_sparse_moe.gate.weight"])
    from transformers import MixtralForCausalLM

    _, info = MixtralForCausalLM.from_pretrained(str(tmp_path / "three"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _assert_current(tmp_path / "three", layout="mixtral")
    card = (tmp_path / "three" / "README.md").read_text()
    assert "| experts | 3, top-2 |" in card and models["story"] in card


def test_add_expert_in_place_and_without_a_recipe(models, moe, tmp_path):
    import shutil

    target = tmp_path / "edit_me"
    shutil.copytree(moe, target)
    (target / "moeforge_config.yml").unlink()
    with pytest.raises(ConfigError, match="has no moeforge_config.yml recording the gate mode; pass --gate-mode"):
        add_expert(target, models["story"], prompts=["x"], quiet=True)
    with pytest.raises(ConfigError, match="hidden gates need the base model"):
        add_expert(target, models["story"], prompts=["x"], gate_mode="hidden", quiet=True)
    add_expert(target, models["story"], gate_mode="random", random_seed=4, quiet=True)
    got = read_tensors(target)
    assert got["model.layers.1.block_sparse_moe.gate.weight"].shape == (3, 32)
    assert torch.equal(got["model.layers.1.block_sparse_moe.experts.2.w2.weight"],
                       read_tensors(models["story"])["model.layers.1.mlp.down_proj.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edit_me.")]  # no temporaries left
    _assert_current(target, layout="mixtral")
    assert "| experts | 3, top-2 |" in (target / "README.md").read_text()


def test_add_expert_refusals_write_nothing(models, moe, tmp_path):
    from moeforge.toy import make_dense

    make_dense(tmp_path / "wide", hidden_size=48)
    before = {p.name: p.read_bytes() for p in moe.iterdir()}
    with pytest.raises(SourceError, match="hidden_size is 48, but the MoE's is 32"):
        add_expert(moe, str(tmp_path / "wide"), prompts=["x"], quiet=True)
    with pytest.raises(ConfigError, match="--prompt: required with gate_mode 'hidden'"):
        add_expert(moe, models["story"], quiet=True)
    with pytest.raises(ConfigError, match="--expert: source_model: must not be empty"):
        add_expert(moe, " ", prompts=["x"], quiet=True)
    assert {p.name: p.read_bytes() for p in moe.iterdir()} == before


def test_extract_refusals(models, moe, tmp_path):
    with pytest.raises(SourceError, match="'LlamaForCausalLM' is not an MoE layout"):
        extract_expert(models["base"], 0, tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


def test_cli_extract_and_add_expert(models, moe, tmp_path):
    r = run("extract", moe, "--expert", "5", tmp_path / "x")
    _assert_clean_failure(r, tmp_path / "x", 2, "--expert: 5 is not an expert", "numbered 0..1")
    r = run("add-expert", moe, "--expert", models["story"], "--prompt", "Once", "--prompts", "upon",
            "--out", tmp_path / "y", "--hidden-dtype", "float32")
    assert r.returncode == 0 and "expert 2 added" in r.stderr, r.stderr
    recipe = moeforge.MoEConfig.from_yaml(tmp_path / "y" / "moeforge_config.yml")
    assert recipe.experts[2].positive_prompts == ["Once", "upon"]


def test_qwen3_moe_that_moeforge_built_can_be_edited(qwen_models, tmp_path):
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts; the layout reads either spelling."""
    q = qwen_models["qwen3"]
    moeforge.build(expert_config(q, [q, q], gate_mode="random"), tmp_path / "moe", quiet=True, allow_all_same=True)
    add_expert(tmp_path / "moe", q, out_dir=tmp_path / "more", gate_mode="random", quiet=True)
    config = json.loads((tmp_path / "more" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config.get("num_experts") or config.get("num_local_experts")) == 3
    extract_expert(tmp_path / "more", 2, tmp_path / "dense", quiet=True)
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "qwen3"
