"""WEMoE on tiny local models: step-0 equivalence with task arithmetic, router-only test-time adaptation
that lowers entropy and beats task arithmetic, E-WEMoE sparsity and parameter counts, export and reload."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeforge.errors import ConfigError
from moeforge.wemoe.config import WEMoEConfig
from moeforge.wemoe.data import load_task_data, sequential_batches
from moeforge.wemoe.families import family_named
from moeforge.wemoe.model import build_wemoe_model, open_sources, static_model
from moeforge.wemoe.tta import entropy_loss


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the suite shares two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip_tasks(tmp_path_factory, one_thread) -> dict:
    from moeforge.wemoe.toy import make_clip_tasks

    return make_clip_tasks(tmp_path_factory.mktemp("clip"))


def clip_config(base: dict, **extra) -> WEMoEConfig:
    tta = {"lr": 1e-3, "max_steps": 100, "checkpoint_every": 0, **extra.pop("tta", {})}
    return WEMoEConfig.from_dict({**base, "tta": tta, **extra})


def build(config: WEMoEConfig):
    family = family_named(config.family)
    sources = open_sources(config, family)
    return build_wemoe_model(config, family, sources).attach_runtime(str(sources.base.path))


def task_batches(model, task: str, batch_size: int = 48):
    data = load_task_data(next(t for t in model.config.experts if t.name == task), model.family.data_kind, task)
    return list(sequential_batches(data, model.runtime.collate, batch_size))


def mean_entropy(model, batch_size: int = 48) -> float:
    """Entropy of the model's predictions on every task's data, averaged over tasks."""
    total = []
    with torch.no_grad():
        for task in model.task_names:
            ents = [entropy_loss(model.task_logits(task, b)) for b in task_batches(model, task, batch_size)]
            total.append(float(torch.stack(ents).mean()))
    return sum(total) / len(total)


@pytest.fixture(scope="module")
def adapted(clip_tasks, tmp_path_factory):
    """The default 2-layer WEMoE, adapted for 100 steps (lr 1e-3) and written to OUT."""
    from moeforge.wemoe import run

    out = tmp_path_factory.mktemp("wemoe") / "out"
    result = run(clip_config(clip_tasks), out, device="cpu", quiet=True)
    return result, out


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(rooter_hidden_layers=1), "rooter_hidden_layers: unknown key"),
    (lambda c: c["experts"][0].pop("classes"), "experts.0.classes: required for family clip-vision"),
    (lambda c: c.update(family="causal-lm"), "experts.0.classes: only for family clip-vision"),
    (lambda c: c["experts"][1].update(name=c["experts"][0]["name"]), "experts.1.name"),
    (lambda c: c.update(sparsity=1.0), "sparsity"),
    (lambda c: c.update(router_hidden_layers=3), "router_hidden_layers"),
    (lambda c: c.update(templates=["no slot"]), "templates.0"),
    (lambda c: c["tta"].update(lr=0), "tta.lr"),
])
def test_config_errors_are_one_line(change, needle):
    cfg = {"family": "clip-vision", "base_model": "b", "tta": {},
           "experts": [{"name": "a", "source_model": "x", "data": "d", "classes": ["p", "q"]},
                       {"name": "b", "source_model": "y", "data": "d", "classes": ["p", "q"]}]}
    change(cfg)
    with pytest.raises(ConfigError) as e:
        WEMoEConfig.from_dict(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_defaults_are_fusionbench():
    cfg = WEMoEConfig.from_dict({"family": "causal-lm", "base_model": "b",
                                 "experts": [{"name": "a", "source_model": "x", "data": "d.txt"}]})
    assert (cfg.init_lambda, cfg.router_hidden_layers, cfg.batch_reduce, cfg.router_init_std) == (0.3, 2, True, 0.01)
    t = cfg.tta
    assert (t.optimizer, t.lr, t.batch_size, t.max_steps, t.grad_accumulate) == ("adam", 1e-4, 16, 1000, True)
    assert not cfg.uses_shared_router and cfg.model_copy(update={"sparsity": 0.9}).uses_shared_router


# ---- step 0 -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_step0_with_zero_init_std_is_task_arithmetic(clip_tasks, depth):
    model = build(clip_config(clip_tasks, router_init_std=0.0, router_hidden_layers=depth))
    ta = static_model(model.family, model.sources, [0.3, 0.3])
    for task in model.task_names:
        batch = task_batches(model, task)[0]
        model.context.record = []
        with torch.no_grad():
            ours, theirs = model.task_logits(task, batch), model.runtime.logits(ta, task, batch)
        weights = torch.stack(model.context.record)
        model.context.record = None
        assert torch.allclose(weights, torch.full_like(weights, 0.3), atol=1e-7)
        assert (ours - theirs).abs().max() < 1e-5
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.slow
def test_step0_with_default_init_is_task_arithmetic_up_to_noise(clip_tasks):
    model = build(clip_config(clip_tasks))
    ta = static_model(model.family, model.sources, [0.3, 0.3])
    batch = task_batches(model, "colors")[0]
    with torch.no_grad():
        diff = (model.task_logits("colors", batch) - model.runtime.logits(ta, "colors", batch)).abs().max()
    assert 0 < diff < 0.5  # N(0, 0.01^2) router weights: close to, not equal to, task arithmetic


# ---- adaptation ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_only_router_parameters_train(clip_tasks):
    from accelerate import Accelerator

    from moeforge.wemoe.data import load_task_data
    from moeforge.wemoe.tta import adapt

    config = clip_config(clip_tasks, tta={"lr": 1e-2, "max_steps": 3})
    model = build(config)
    routers = {id(p) for p in model.router_parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == routers
    frozen = {k: v.clone() for k, v in model.hf.state_dict(keep_vars=False).items()}
    tvs = {(i, n): b.task_vector(n).clone() for i, b in enumerate(model.moe) for n in b._tv_names}
    before = model.router_tensors()
    data = {t.name: load_task_data(t, "images", t.name) for t in config.experts}
    adapt(model, data, config, Accelerator(cpu=True), quiet=True)
    after_state = model.hf.state_dict()
    changed = [k for k in frozen if not torch.equal(frozen[k], after_state[k])]
    assert changed and all(".router." in k for k in changed)
    assert all(torch.equal(b.task_vector(n), tvs[(i, n)]) for i, b in enumerate(model.moe) for n in b._tv_names)
    after = model.router_tensors()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("out.bias"))


@pytest.mark.slow
def test_adaptation_lowers_entropy_and_beats_task_arithmetic(adapted, clip_tasks):
    from moeforge.wemoe.evaluation import evaluate

    result, out = adapted
    step0 = build(clip_config(clip_tasks))
    step0.batch_reduce = False
    adapted_model = result.model
    assert adapted_model.batch_reduce  # as trained; sample-wise routing is switched on when loaded
    adapted_model.batch_reduce = False
    try:
        assert mean_entropy(adapted_model) < 0.8 * mean_entropy(step0)
    finally:
        adapted_model.batch_reduce = True
    curve = json.loads((out / "wemoe.json").read_text())["tta"]
    assert curve["loss_last_10pct_mean"] < curve["loss_first"]
    report = evaluate(out, device="cpu")
    assert report.mean("WEMoE") > report.mean("task arithmetic") + 4, report.table()
    assert report.mean("fine-tuned (own task)") > report.mean("task arithmetic")


# ---- export and reload --------------------------------------------------------------------------

@pytest.mark.slow
def test_output_holds_routers_metadata_and_card_only(adapted, clip_tasks):
    result, out = adapted
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "router.safetensors", "wemoe.json"]
    with safe_open(str(out / "router.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in names)
    pattern = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.router\.(hidden|out)\.(weight|bias)$")
    assert all(pattern.match(k) for k in names) and len(names) == 2 * 4
    meta = json.loads((out / "wemoe.json").read_text())
    assert meta["tasks"] == ["colors", "quadrant"] and meta["config"]["tta"]["max_steps"] == 100
    for rec in [meta["sources"]["base"], *meta["sources"]["experts"].values()]:
        for name, digest in rec["files"].items():
            import hashlib

            assert hashlib.sha256((Path(rec["path"]) / name).read_bytes()).hexdigest() == digest
    assert meta["params"]["trainable"] == sum(v.numel() for v in result.model.router_tensors().values())
    assert len(meta["tta"]["curve"]) <= 51 and meta["tta"]["steps"] == 100
    card = (out / "README.md").read_text()
    assert "moeforge.wemoe.load" in card and clip_tasks["base_model"] in card


@pytest.mark.slow
def test_reload_reproduces_adapted_predictions(adapted):
    from moeforge.wemoe import load

    result, out = adapted
    reloaded = load(out)
    assert not reloaded.batch_reduce and not reloaded.hf.training
    original = result.model
    original.batch_reduce = False
    try:
        for task in original.task_names:
            batch = task_batches(original, task)[0]
            with torch.no_grad():
                a, b = original.task_logits(task, batch), reloaded.task_logits(task, batch)
            assert torch.equal(a, b)
    finally:
        original.batch_reduce = True


@pytest.mark.slow
def test_reload_refuses_changed_sources(adapted, tmp_path):
    import shutil

    from moeforge.errors import SourceError
    from moeforge.wemoe import load

    _, out = adapted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "wemoe.json").read_text())
    meta["sources"]["experts"]["colors"]["files"]["model.safetensors"] = "0" * 64
    (copy / "wemoe.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match="colors.*changed since"):
        load(copy)


@pytest.mark.slow
def test_resume_gives_the_same_routers(clip_tasks, tmp_path, monkeypatch):
    from moeforge.wemoe import run
    from moeforge.wemoe.tta import Checkpointer

    config = clip_config(clip_tasks, tta={"lr": 1e-2, "max_steps": 6, "checkpoint_every": 3})
    run(config, tmp_path / "straight", device="cpu", quiet=True)

    real_save = Checkpointer.save

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "resumed", device="cpu", quiet=True)
    assert not (tmp_path / "resumed").exists()
    ckpt = tmp_path / "resumed.wemoe-checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(Checkpointer, "save", real_save)
    run(config, tmp_path / "resumed", device="cpu", quiet=True, resume=True)
    assert not ckpt.exists()

    def routers(path):
        with safe_open(str(path / "router.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = routers(tmp_path / "straight"), routers(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(config, tmp_path / "again", device="cpu", quiet=True, resume=True)


# ---- E-WEMoE ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sparse_task_vectors_and_shared_router(clip_tasks):
    dense = build(clip_config(clip_tasks))
    sparse = build(clip_config(clip_tasks, sparsity=0.9))
    assert sparse.shared_router is not None and all(b.router is sparse.shared_router for b in sparse.moe)
    assert list(sparse.router_tensors()) == [f"shared_router.{n}" for n in ("hidden.weight", "hidden.bias",
                                                                             "out.weight", "out.bias")]
    kept_total = 0
    for d_block, s_block in zip(dense.moe, sparse.moe):
        for name in d_block._tv_names:
            full, kept = d_block.task_vector(name), s_block.task_vector(name)
            for task in range(full.shape[0]):
                f, k = full[task].flatten(), kept[task].flatten()
                nz = k != 0
                assert int(nz.sum()) == round(0.1 * f.numel())
                assert torch.equal(k[nz], f[nz])  # kept entries are unchanged
                if (~nz).any():
                    assert f[nz].abs().min() >= f[~nz].abs().max()  # and they are the largest
                kept_total += int(nz.sum())
    d, s = dense.param_counts(), sparse.param_counts()
    assert s["trainable"] == d["trainable"] // len(dense.moe)  # one router instead of one per block
    assert s["task_vectors"] == kept_total < d["task_vectors"] / 9
    assert s["total"] == s["dense_model"] + s["task_vectors"] + s["trainable"]
    assert s["dense_model"] == d["dense_model"]


@pytest.mark.parametrize("depth, trainable", [(2, 7_160_928), (1, 73_824)])
def test_parameter_counts_match_the_paper_for_vit_b32(depth, trainable):
    """CLIP-ViT-B/32, 8 tasks: the paper reports 7.16M (2-layer) and 73.8K (1-layer) trainable parameters."""
    from transformers import CLIPConfig, CLIPModel

    from moeforge.wemoe.model import assemble

    family = family_named("clip-vision")
    with torch.device("meta"):
        hf = CLIPModel(CLIPConfig())
    config = WEMoEConfig.from_dict({"family": "clip-vision", "base_model": "b", "router_hidden_layers": depth,
                                    "experts": [{"name": f"t{i}", "source_model": "x", "data": "d", "classes": ["a"]}
                                                for i in range(8)]})
    _, blocks = family.blocks(hf)
    tvs = [{n: torch.empty((8, *p.shape), device="meta") for n, p in b.mlp.named_parameters()} for b in blocks]
    counts = assemble(hf, family, config, tvs).param_counts()
    mlp = 12 * (768 * 3072 * 2 + 3072 + 768)
    assert counts["trainable"] == trainable
    assert counts["task_vectors"] == 8 * mlp
    assert counts["total"] == counts["dense_model"] + 8 * mlp + trainable


# ---- causal LMs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal_config(models, tmp_path_factory, one_thread):
    from conftest import CODE, STORY

    root = tmp_path_factory.mktemp("texts")
    (root / "code.txt").write_text("\n".join(CODE + ["def sub(a, b): return a - b"]) + "\n")
    (root / "story.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in STORY + ["The dragon slept"]))
    return {"family": "causal-lm", "base_model": models["base"], "max_length": 32,
            "experts": [{"name": "code", "source_model": models["code"], "data": str(root / "code.txt")},
                        {"name": "story", "source_model": models["story"], "data": str(root / "story.jsonl")}],
            "tta": {"lr": 1e-2, "max_steps": 8, "batch_size": 3, "checkpoint_every": 0}}


def test_causal_lm_step0_is_task_arithmetic(causal_config):
    model = build(WEMoEConfig.from_dict({**causal_config, "router_init_std": 0.0}))
    ta = static_model(model.family, model.sources, [0.3, 0.3])
    batch = task_batches(model, "code", 8)[0]
    assert batch["attention_mask"].min() == 0  # padded: the routing mean must skip pads
    with torch.no_grad():
        assert (model.task_logits("code", batch) - model.runtime.logits(ta, "code", batch)).abs().max() < 1e-5


def test_causal_lm_padding_does_not_change_sample_wise_routing(causal_config):
    model = build(WEMoEConfig.from_dict({**causal_config, "router_init_std": 0.5}))
    model.batch_reduce = False
    texts = ["Once upon a time", "def add(a, b): return a + b and more words here"]
    together = model.runtime.collate([(t, None) for t in texts])
    alone = model.runtime.collate([(texts[0], None)])
    with torch.no_grad():
        a = model.task_logits("story", together)
        b = model.task_logits("story", alone)
    assert torch.allclose(a[: len(b)], b, atol=1e-5)


def test_causal_lm_adapts_exports_and_reloads(causal_config, tmp_path):
    from moeforge.wemoe import load, run

    config = WEMoEConfig.from_dict(causal_config)
    step0 = build(config)
    result = run(config, tmp_path / "out", device="cpu", quiet=True)
    assert mean_entropy(result.model, 8) < mean_entropy(step0, 8)
    reloaded = load(tmp_path / "out")
    names = json.loads((tmp_path / "out" / "wemoe.json").read_text())["routers"]["naming"]
    assert names.startswith("model.layers.")
    result.model.batch_reduce = False
    batch = task_batches(reloaded, "story", 8)[0]
    with torch.no_grad():
        assert torch.equal(result.model.task_logits("story", batch), reloaded.task_logits("story", batch))

    from moeforge.wemoe.evaluation import evaluate

    report = evaluate(tmp_path / "out", device="cpu")  # next-token accuracy on the texts
    assert set(report.rows) == {"pretrained", "fine-tuned (own task)", "task arithmetic", "WEMoE"}
    assert all(0 <= v <= 100 for row in report.rows.values() for v in row.values())
    assert report.rows["fine-tuned (own task)"]["code"] > report.rows["pretrained"]["code"]
    assert report.counts["code"] > len(report.tasks)  # scored per predicted token
