"""The foundation: a config becomes a Mixtral checkpoint that transformers loads, and that computes the right thing."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors

import moeforge


def test_output_loads_in_transformers_with_no_key_problems(models, out, tmp_path):
    from transformers import MixtralForCausalLM

    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True)
    model, info = MixtralForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["missing_keys"]
    names = set(read_tensors(out))
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(read_tensors(tmp_path / "resaved")) == names


def test_output_files(models, out):
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    result = moeforge.build(cfg, out, quiet=True, random_seed=7)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "moeforge_config.yml", "model.safetensors"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2
    assert result.layout == "mixtral" and result.random_seed == 7
    assert result.active_params == result.total_params  # top-2 of 2 experts
    # the tokenizer is copied byte for byte, not re-saved with altered padding
    assert (out / "tokenizer.json").read_bytes() == (models["base"] + "/tokenizer.json" and
                                                      open(models["base"] + "/tokenizer.json", "rb").read())
    # the resolved config rebuilds the same model
    again = moeforge.build(out / "moeforge_config.yml", out.parent / "again", quiet=True, random_seed=7)
    assert again.files == result.files
    for name in result.files:
        assert (out / name).read_bytes() == (out.parent / "again" / name).read_bytes()


def test_no_copy_tokenizer(models, out):
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True, copy_tokenizer=False)
    assert not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"])
def test_copies_of_the_base_reproduce_its_logits(models, out, gate_mode):
    """The core correctness proof: whatever the router says, identical experts compute the dense MLP."""
    cfg = expert_config(models["base"], [models["base"]] * 4, gate_mode=gate_mode, experts_per_token=2)
    moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=1)
    diff = (logits(out) - logits(models["base"])).abs().max().item()
    assert diff <= 1e-4, diff


def test_experts_and_base_tensors_are_copied_bit_for_bit(models, out):
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True)
    got = read_tensors(out)
    base, code, story = read_tensors(models["base"]), read_tensors(models["code"]), read_tensors(models["story"])
    for layer in range(2):
        for e, src in enumerate((code, story)):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out_t = got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert torch.equal(out_t, src[f"model.layers.{layer}.mlp.{proj}.weight"])
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name
    assert not any(".mlp." in n for n in got)


def test_mixture_differs_from_base_when_experts_differ(models, out):
    """Guards the equivalence test against passing vacuously (e.g. experts never read)."""
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True)
    assert (logits(out) - logits(models["base"])).abs().max().item() > 1e-3


def test_residual_scale_and_noise(models, out, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    cfg["experts"][0]["residual_scale"] = 0.5
    cfg["experts"][1]["noise_scale"] = 0.01
    moeforge.build(cfg, out, quiet=True, random_seed=3)
    got, code, story = read_tensors(out), read_tensors(models["code"]), read_tensors(models["story"])
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.0.w2.weight"], code["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.0.w1.weight"], code["model.layers.0.mlp.gate_proj.weight"])
    noisy = got["model.layers.0.block_sparse_moe.experts.1.w1.weight"] - story["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < noisy.std().item() < 0.02
    moeforge.build(cfg, tmp_path / "same_seed", quiet=True, random_seed=3)
    assert torch.equal(read_tensors(tmp_path / "same_seed")["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                       got["model.layers.0.block_sparse_moe.experts.1.w1.weight"])


def test_shards_respect_the_limit_and_have_an_index(models, out):
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True, out_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = read_tensors(out)
    for shard in shards:
        payload = sum(tensors[n].numel() * tensors[n].element_size() for n, f in index["weight_map"].items() if f == shard)
        assert payload <= 60_000 or len([f for f in index["weight_map"].values() if f == shard]) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shard_size_in_parameters_like_mergekit(models, out):
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, quiet=True, out_shard_size="10K")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # 10K float32 parameters = 40 kB per shard


@pytest.mark.parametrize("variant", ["base_sharded", "base_bin"])
def test_sharded_and_bin_inputs_give_the_same_output(models, out, tmp_path, variant):
    ref = tmp_path / "ref"
    moeforge.build(expert_config(models["base"], [models["base"], models["code"]]), ref, quiet=True, random_seed=2)
    moeforge.build(expert_config(models[variant], [models[variant], models["code"]]), out, quiet=True, random_seed=2)
    a, b = read_tensors(ref), read_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bfloat16_output(models, out):
    cfg = expert_config(models["base"], [models["code"], models["story"]], dtype="bfloat16")
    moeforge.build(cfg, out, quiet=True)
    got = read_tensors(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    code = read_tensors(models["code"])
    assert torch.equal(got["model.layers.1.block_sparse_moe.experts.0.w3.weight"],
                       code["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_mistral_inputs(models, out):
    moeforge.build(expert_config(models["mistral"], [models["mistral"]] * 2, gate_mode="random"), out,
                   quiet=True, allow_all_same=True)
    diff = (logits(out) - logits(models["mistral"])).abs().max().item()
    assert diff <= 1e-4
