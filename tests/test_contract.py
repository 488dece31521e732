"""Every command on every layout: the contract each registered layout keeps (and a new one gets by being
registered). For each layout, and each shared-expert count it takes:

build -> strict load by the layout's reader -> identical experts reproduce the dense base -> save_pretrained
keeps the names -> verify -> plan (dry run) matches what was written -> add-expert -> verify, and the card and
manifest say the new count -> extract gives back the added expert bit for bit -> verify on the dense model.

Models are tiny (2 layers, hidden 32); each build is shared by the steps that read it.
"""
import json

import pytest
import torch
from helpers import logits, read_tensors

import moeforge
from moeforge.edit import add_expert, extract_expert
from moeforge.layouts import LAYOUTS
from moeforge.verify import verify
from moeforge.writer.manifest import MANIFEST

TEXTS = ("Write a Python function that sorts", "Once upon a time there")


def _shared_counts(layout):
    if layout.shared_expert is None:
        return [0]
    most = layout.max_shared_experts if layout.max_shared_experts is not None else 2
    return sorted({n for n in (0, 1, 2) if layout.min_shared_experts <= n <= most})


CASES = [(layout, n) for layout in LAYOUTS for n in _shared_counts(layout)]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> (base, another model of the same shape): made on first use."""
    from moeforge.toy import make_dense

    root, made = tmp_path_factory.mktemp("contract_models"), {}

    def get(family):
        if family not in made:
            base, other = root / family / "base", root / family / "other"
            make_dense(base, family=family, seed=0)
            make_dense(other, family=family, seed=1)
            made[family] = (str(base), str(other))
        return made[family]

    return get


@pytest.fixture(scope="module", params=CASES, ids=[f"{l.name}-shared{n}" for l, n in CASES])
def built(request, family_models, tmp_path_factory):
    layout, n_shared = request.param
    base, other = family_models(layout.families[0])
    shared = [{"source_model": base, "residual_scale": 0.0, **({"positive_prompts": ["x"]} if layout.shared_router else {})}
              for _ in range(n_shared)]
    cfg = {"base_model": base, "architecture": layout.name, "gate_mode": "random", "dtype": "float32",
           "experts": [{"source_model": base}, {"source_model": base}], "shared_experts": shared or None}
    root = tmp_path_factory.mktemp(f"contract_{layout.name}_{n_shared}")
    options = dict(random_seed=1, allow_all_same=True, out_shard_size="60KB", quiet=True)
    result = moeforge.build(cfg, root / "moe", **options)
    assert result.layout == layout.name
    return {"layout": layout, "shared": n_shared, "base": base, "other": other, "cfg": cfg, "options": options,
            "out": root / "moe", "root": root}


def _has_reader(layout) -> bool:
    import transformers

    return hasattr(transformers, layout.architectures[0]) or bool(layout.extra_files())


def _load(layout, path):
    """The layout's own reader, strictly: every tensor used, none missing, none reshaped."""
    import transformers

    arch = layout.architectures[0]
    assert _has_reader(layout), f"{arch}: transformers has no class for it, and the layout ships no code to load it"
    if hasattr(transformers, arch):
        model, info = getattr(transformers, arch).from_pretrained(str(path), output_loading_info=True)
    else:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def _count(layout, path) -> int:
    return layout.shape_of(json.loads((path / "config.json").read_text())).num_experts


def _assert_manifest_current(path):
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {MANIFEST}


def test_build_verifies(built):
    report = verify(built["out"])
    assert report.ok, report.problems
    _assert_manifest_current(built["out"])


def test_plan_matches_what_was_written(built):
    report = moeforge.dry_run(built["cfg"], **{k: v for k, v in built["options"].items() if k != "quiet"})
    out = built["out"]
    written = sorted(p.name for p in out.glob("*.safetensors"))
    assert [s.name for s in report.shards] == written
    assert [s.nbytes for s in report.shards] == [(out / n).stat().st_size for n in written]
    assert sum(s.tensors for s in report.shards) == len(read_tensors(out))
    assert (report.layout, report.num_experts) == (built["layout"].name, _count(built["layout"], out))
    assert report.total_params == sum(t.numel() for t in read_tensors(out).values())


def test_loads_strictly_and_save_pretrained_keeps_the_names(built, tmp_path):
    model = _load(built["layout"], built["out"])
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(read_tensors(tmp_path / "resaved")) == set(read_tensors(built["out"]))


def test_identical_experts_reproduce_the_base(built):
    """Through the layout's own reader (transformers' class, or the code the layout ships)."""
    layout, out, base = built["layout"], built["out"], built["base"]
    assert _has_reader(layout), f"{layout.name}: no reader to check equivalence with"
    moe = logits(out, TEXTS)
    assert (moe - logits(base, TEXTS)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def added(built):
    add_expert(built["out"], built["other"], out_dir=built["root"] / "added", gate_mode="random", random_seed=2,
               quiet=True)
    return built["root"] / "added"


def test_add_expert_verifies_and_says_the_new_count(built, added):
    report = verify(added)
    assert report.ok, report.problems
    _assert_manifest_current(added)
    assert _count(built["layout"], added) == 3
    assert "| experts | 3, top-2 |" in (added / "README.md").read_text()
    recipe = moeforge.MoEConfig.from_yaml(added / "moeforge_config.yml")
    assert [e.source_model for e in recipe.experts][-1] == built["other"]
    _load(built["layout"], added)


def test_extract_gives_back_the_added_expert(built, added, tmp_path):
    import transformers

    extract_expert(added, 2, tmp_path / "dense", quiet=True)
    report = verify(tmp_path / "dense")
    assert report.ok, report.problems
    _assert_manifest_current(tmp_path / "dense")
    got, other, base = read_tensors(tmp_path / "dense"), read_tensors(built["other"]), read_tensors(built["base"])
    mlp = {k for k in got if ".mlp." in k}
    assert mlp == {k for k in other if ".mlp." in k}
    assert all(torch.equal(got[k], other[k]) for k in mlp)
    assert all(torch.equal(got[k], base[k]) for k in set(base) - mlp)  # the attention, norms, embeddings
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    _, info = model_class.from_pretrained(str(tmp_path / "dense"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
