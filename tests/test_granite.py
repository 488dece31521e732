"""GraniteMoeShared outputs: fused experts written by streaming, Llama/Mistral inputs expressed exactly, the
ungated shared MLP, and the reading commands (verify, add-expert, extract) through the fused tensors."""
import json

import pytest
import torch
from conftest import expert_config
from helpers import logits, read_tensors

import moeforge
from moeforge.edit import add_expert, extract_expert
from moeforge.errors import ConfigError
from moeforge.verify import verify

TEXTS = ("Write a Python function that sorts", "Once upon a time there")
MOE = "model.layers.{}.block_sparse_moe."


def _load(out):
    import transformers

    model, info = transformers.GraniteMoeSharedForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def _assert_verifies(out):
    report = verify(out)
    assert report.ok, report.problems


@pytest.mark.parametrize("base", ["base", "mistral"])
def test_identical_experts_reproduce_the_base(models, out, tmp_path, base):
    """Llama and Mistral inputs; the shared MLP is there (residual_scale 0 makes it add nothing)."""
    b = models[base]
    cfg = expert_config(b, [b] * 4, architecture="granite",
                        shared_experts=[{"source_model": models["code" if base == "base" else base], "residual_scale": 0.0}])
    result = moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=0, out_shard_size="40KB")
    assert result.layout == "granite" and len(result.files) > 1
    model = _load(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteMoeSharedForCausalLM"] and config["num_local_experts"] == 4
    assert config["attention_multiplier"] == 8 ** -0.5 and config["shared_intermediate_size"] == 64
    assert all(config[k] == 1.0 for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"))
    written = read_tensors(out)
    dense = read_tensors(b)
    assert written[MOE.format(0) + "input_linear.weight"].shape == (4, 128, 32)
    assert written[MOE.format(0) + "output_linear.weight"].shape == (4, 32, 64)
    assert written["model.layers.1.shared_mlp.input_linear.weight"].shape == (128, 32)
    fused = written[MOE.format(1) + "input_linear.weight"][2]  # expert 2: gate rows, then up rows
    assert torch.equal(fused, torch.cat([dense["model.layers.1.mlp.gate_proj.weight"],
                                         dense["model.layers.1.mlp.up_proj.weight"]]))
    assert torch.equal(written[MOE.format(1) + "output_linear.weight"][3], dense["model.layers.1.mlp.down_proj.weight"])
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(read_tensors(tmp_path / "resaved")) == set(written)  # transformers saves the same names
    assert (logits(out, TEXTS) - logits(b, TEXTS)).abs().max() <= 1e-4
    _assert_verifies(out)


def test_different_experts_compute_the_intended_moe(models, out):
    """Routed experts [code, story, base], top-2 renormalised; two shared experts summed, one scaled by its
    residual_scale: the native forward equals the same MoE computed from the dense models' own MLPs."""
    from transformers import LlamaForCausalLM

    shared = [{"source_model": models["story"], "residual_scale": 0.5}, {"source_model": models["code"]}]
    cfg = expert_config(models["base"], [models["code"], models["story"], models["base"]], gate_mode="random",
                        architecture="granite", shared_experts=shared)
    moeforge.build(cfg, out, quiet=True, random_seed=3)
    assert json.loads((out / "config.json").read_text())["shared_intermediate_size"] == 128
    routers = read_tensors(out)
    dense = {name: LlamaForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
             for name in ("base", "code", "story")}
    reference = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    for layer, block in enumerate(reference.model.layers):
        mlps = [dense[n].model.layers[layer].mlp for n in ("code", "story", "base")]
        shared_mlps = [(0.5, dense["story"].model.layers[layer].mlp), (1.0, dense["code"].model.layers[layer].mlp)]
        block.mlp = _ReferenceMoE(routers[MOE.format(layer) + "router.layer.weight"], mlps, shared_mlps, top_k=2)
    got = _logits_of(_load(out).eval(), out)
    want = _logits_of(reference, out)
    assert (got - want).abs().max() <= 1e-4
    assert (got - _logits_of(dense["base"], out)).abs().max() > 1e-2  # the experts do make a difference
    _assert_verifies(out)


class _ReferenceMoE(torch.nn.Module):
    """Softmax over the top-k router logits, the chosen experts' outputs weighted by it, plus the shared MLPs."""

    def __init__(self, router, mlps, shared, top_k):
        super().__init__()
        self.router, self.mlps, self.shared, self.top_k = router, mlps, shared, top_k

    def forward(self, x):
        top, index = (x @ self.router.T).topk(self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        outputs = torch.stack([mlp(x) for mlp in self.mlps], dim=-2)  # (..., experts, hidden)
        chosen = outputs.gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))
        return (chosen * weights.unsqueeze(-1)).sum(-2) + sum(scale * mlp(x) for scale, mlp in self.shared)


def _logits_of(model, tokenizer_dir):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(str(tokenizer_dir))(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)


def test_plan_matches_what_build_writes(models, out):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="cheap_embed",
                        experts_per_token=1, architecture="granite",
                        shared_experts=[{"source_model": models["base"]}, {"source_model": models["story"]}])
    report = moeforge.dry_run(cfg, out, out_shard_size="30KB")
    result = moeforge.build(cfg, out, out_shard_size="30KB", quiet=True)
    assert (report.total_params, report.active_params) == (result.total_params, result.active_params)
    assert sum(t.numel() for t in read_tensors(out).values()) == report.total_params
    assert [s.name for s in report.shards] == result.files and len(result.files) > 1
    assert [s.nbytes for s in report.shards] == [(out / f).stat().st_size for f in result.files]
    expert_params = 2 * 3 * 64 * 32  # per layer: one routed expert is active of two
    assert report.total_params - report.active_params == expert_params
    # fused experts are byte copies of their members; only the two shared down projections (joined along
    # columns) and the routers are not
    assert report.converted_bytes == 2 * 32 * 128 * 4 and report.computed_bytes == 2 * 2 * 32 * 4


def test_add_expert_and_extract_read_the_fused_tensors(models, out, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = expert_config(models["base"], [models["code"], models["base"]], gate_mode="random", architecture="granite",
                        shared_experts=[{"source_model": models["story"]}])
    moeforge.build(cfg, out, quiet=True, random_seed=1)
    add_expert(out, models["story"], out_dir=tmp_path / "three", gate_mode="random", random_seed=2, quiet=True)
    three, two = read_tensors(tmp_path / "three"), read_tensors(out)
    assert json.loads((tmp_path / "three" / "config.json").read_text())["num_local_experts"] == 3
    for layer in range(2):
        for kind in ("input_linear", "output_linear", "router.layer"):
            name = MOE.format(layer) + kind + ".weight"
            assert three[name].shape[0] == 3 and torch.equal(three[name][:2], two[name])
    story = read_tensors(models["story"])
    assert torch.equal(three[MOE.format(1) + "output_linear.weight"][2], story["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(three["model.layers.0.shared_mlp.input_linear.weight"],
                       two["model.layers.0.shared_mlp.input_linear.weight"])
    _load(tmp_path / "three")

    extract_expert(out, 1, tmp_path / "base_again", quiet=True)
    got, base = read_tensors(tmp_path / "base_again"), read_tensors(models["base"])
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)
    _, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "base_again"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_refusals(models, out, tmp_path):
    from moeforge.toy import make_dense

    make_dense(tmp_path / "wide_heads", seed=0, head_dim=16)
    make_dense(tmp_path / "windowed", family="mistral", seed=0, sliding_window=16)
    for base, why in (("wide_heads", "custom_head_dim"), ("windowed", "sliding_window")):
        b = str(tmp_path / base)
        with pytest.raises(ConfigError, match=f"granite cannot express {why}"):
            moeforge.build(expert_config(b, [b] * 2, architecture="granite"), out, quiet=True, allow_all_same=True)
    with pytest.raises(ConfigError, match="shared experts are ungated: remove their prompts"):
        moeforge.build(expert_config(models["base"], [models["base"]] * 2, architecture="granite",
                                     shared_experts=[{"source_model": models["code"], "positive_prompts": ["x"]}]),
                       out, quiet=True, allow_all_same=True)
    assert not out.exists()


def test_fine_grained_upcycling_packs_column_slices(models, out):
    """Segments of the dense MLP (gate/up row ranges, down column ranges scaled by g) stacked per expert."""
    cfg = {"upcycle": {"source_model": models["base"], "num_experts": 2, "granularity": 4}, "dtype": "float32",
           "experts_per_token": 1, "architecture": "granite"}
    moeforge.build(cfg, out, quiet=True, random_seed=5)
    t, base = read_tensors(out), read_tensors(models["base"])
    down = base["model.layers.1.mlp.down_proj.weight"]
    assert t[MOE.format(1) + "output_linear.weight"].shape == (8, 32, 16)
    for e in range(8):
        s = e % 4
        assert torch.equal(t[MOE.format(1) + "output_linear.weight"][e], down[:, 16 * s:16 * (s + 1)] * 4)
        assert torch.equal(t[MOE.format(1) + "input_linear.weight"][e][16:],
                           base["model.layers.1.mlp.up_proj.weight"][16 * s:16 * (s + 1)])
    assert (logits(out, TEXTS) - logits(models["base"], TEXTS)).abs().max() <= 1e-4
    _assert_verifies(out)


def test_nan_in_a_converted_fused_tensor_names_the_source(models, out, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from moeforge.errors import SourceError

    bad = tmp_path / "bad"
    shutil.copytree(models["story"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = expert_config(models["base"], [models["code"], str(bad)], gate_mode="random", architecture="granite",
                        dtype="bfloat16")  # converted, so every chunk is checked as it is written
    with pytest.raises(SourceError, match=r"bad/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' "
                                          r"contains 1 NaN/Inf"):
        moeforge.build(cfg, out, quiet=True, random_seed=0)
    assert not out.exists()
