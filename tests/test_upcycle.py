"""Sparse upcycling: plain copies, noise, Drop-Upcycling and fine-grained experts through the build path."""
import json

import pytest
import torch
import yaml
from helpers import logits, read_tensors
from run_cli import run

import moeforge
from moeforge.errors import ConfigError
from moeforge.verify import verify


def upcycle(models, out, seed=5, **up):
    extra = {k: up.pop(k) for k in ("architecture", "experts_per_token", "gate_mode") if k in up}
    cfg = {"upcycle": {"source_model": models["base"], **up}, "dtype": "float32", **extra}
    return moeforge.build(cfg, out, quiet=True, random_seed=seed)


@pytest.mark.parametrize("architecture", ["mixtral", "qwen", "deepseek", "granite"])
def test_plain_copies_reproduce_the_dense_model(models, out, architecture):
    result = upcycle(models, out, num_experts=4, architecture=architecture)
    assert (logits(out) - logits(models["base"])).abs().max() <= 1e-4
    assert result.num_experts == 4 and result.experts_per_token == 2
    assert result.total_params > result.active_params > result.dense_params
    report = verify(out)
    assert report.ok, report.problems


def test_routers_are_nn_linear_init_by_default(models, out):
    upcycle(models, out, num_experts=4)
    gate = read_tensors(out)["model.layers.0.block_sparse_moe.gate.weight"]
    bound = 32 ** -0.5
    assert gate.abs().max() <= bound and gate.std() > bound / 4


def test_fine_grained_experts_split_and_scale(models, out):
    result = upcycle(models, out, num_experts=2, granularity=4, experts_per_token=1)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 4 and config["intermediate_size"] == 16
    t, base = read_tensors(out), read_tensors(models["base"])
    dense_up, dense_down = base["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.down_proj.weight"]
    for e in range(8):
        s = e % 4
        assert torch.equal(t[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"], dense_up[16 * s:16 * (s + 1)])
        assert torch.equal(t[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"], dense_down[:, 16 * s:16 * (s + 1)] * 4)
    gate = t["model.layers.0.block_sparse_moe.gate.weight"]  # virtual groups: each copy's rows are equal
    assert torch.equal(gate[0], gate[3]) and torch.equal(gate[4], gate[7]) and not torch.equal(gate[0], gate[4])
    # step-0 equivalence: the router picks whole copies with equal weights, whose segments sum to the dense MLP
    assert (logits(out) - logits(models["base"])).abs().max() <= 1e-4
    assert result.active_params < result.total_params


def test_drop_upcycling_reinitialises_exactly_the_requested_share(models, out, tmp_path):
    upcycle(models, out, num_experts=4, drop_ratio=0.25, seed=11)
    t, base = read_tensors(out), read_tensors(models["base"])
    dropped_sets = []
    for layer in range(2):
        dense = {p: base[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        for e in range(4):
            w = {p: t[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{n}.weight"]
                 for p, n in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
            rows = {p: set(torch.nonzero((w[p] != dense[p]).any(1)).flatten().tolist()) for p in ("gate", "up")}
            cols = set(torch.nonzero((w["down"] != dense["down"]).any(0)).flatten().tolist())
            assert len(rows["gate"]) == 16 == round(0.25 * 64)  # exactly the requested share of 64 neurons
            assert rows["gate"] == rows["up"] == cols  # the same neurons in all three matrices
            dropped_sets.append(frozenset(cols))
            kept = sorted(set(range(64)) - cols)
            assert torch.equal(w["up"][kept], dense["up"][kept])
            fresh = w["gate"][sorted(cols)]
            assert abs(fresh.std().item() - dense["gate"].std().item()) < 0.5 * dense["gate"].std().item()
    assert len(set(dropped_sets)) == len(dropped_sets)  # different per expert and layer
    upcycle(models, tmp_path / "again", num_experts=4, drop_ratio=0.25, seed=11)
    upcycle(models, tmp_path / "other", num_experts=4, drop_ratio=0.25, seed=12)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() != (tmp_path / "other" / "model.safetensors").read_bytes()


def test_noise_differs_per_expert(models, out):
    upcycle(models, out, num_experts=2, noise_scale=0.01)
    t = read_tensors(out)
    a, b = (t[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in (0, 1))
    assert not torch.equal(a, b) and (a - b).std() > 0.005


def test_bad_upcycle_configs(models, out):
    with pytest.raises(ConfigError, match="granularity: 3 does not divide the intermediate size 64"):
        upcycle(models, out, num_experts=2, granularity=3)
    with pytest.raises(ConfigError, match="experts_per_token: 3 is more than upcycle.num_experts 2"):
        upcycle(models, out, num_experts=2, experts_per_token=3)
    with pytest.raises(ConfigError, match="upcycle.drop_ratio"):
        upcycle(models, out, num_experts=2, drop_ratio=1.5)
    with pytest.raises(ConfigError, match="experts: not allowed with upcycle"):
        moeforge.build({"upcycle": {"source_model": "x", "num_experts": 2}, "experts": []}, out)
    assert not out.exists()


def test_cli_and_config_form_agree(models, tmp_path):
    r = run("upcycle", models["base"], tmp_path / "cli", "--num-experts", "4", "--drop-ratio", "0.5",
            "--random-seed", "3", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "dense base" in r.stderr and "active per token" in r.stderr
    cfg = {"upcycle": {"source_model": models["base"], "num_experts": 4, "drop_ratio": 0.5}, "dtype": "bfloat16"}
    (tmp_path / "up.yml").write_text(yaml.safe_dump(cfg))
    r = run("build", tmp_path / "up.yml", tmp_path / "cfg", "--random-seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (tmp_path / "cfg" / "model.safetensors").read_bytes()
    resolved = yaml.safe_load((tmp_path / "cfg" / "moeforge_config.yml").read_text())
    assert resolved["upcycle"]["num_experts"] == 4 and "experts" not in resolved
