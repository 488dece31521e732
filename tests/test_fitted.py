"""gate_mode fitted: the fitting math on synthetic data, then builds checked against a reference capture."""
import logging
import weakref

import pytest
import torch
from conftest import CODE, STORY, expert_config
from helpers import read_tensors

import moeforge
from moeforge.gates.fitted import shared_labels
from moeforge.gates.fitting import fit_gate


def _clusters(experts=3, per=60, hidden=16, seed=0, offset=4.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(experts, hidden, generator=g) * 2
    labels = torch.arange(experts).repeat_interleave(per)
    x = centers[labels] + torch.randn(len(labels), hidden, generator=g) + offset  # a shared offset, like real states
    return x, labels, centers + offset


def test_softmax_fit_separates_is_deterministic_and_scale_free():
    x, y, _ = _clusters()
    first = fit_gate(x, y, rows=3)
    assert ((x @ first.weight.t()).argmax(1) == y).float().mean() > 0.95
    assert torch.equal(first.weight, fit_gate(x, y, rows=3).weight)  # same input, same bytes
    assert first.weight.sum(0).abs().max() < 1e-3 * first.weight.abs().max()  # softmax + L2: rows sum to zero
    scaled = fit_gate(10 * x, y, rows=3).weight  # features divided by their RMS: same router in raw units
    assert torch.allclose(scaled * 10, first.weight, atol=1e-3 * first.weight.abs().max())
    stronger = fit_gate(x, y, rows=3, l2=1.0).weight
    assert stronger.norm() < first.weight.norm()


def test_negatives_push_their_expert_down():
    x, y, centers = _clusters()
    g = torch.Generator().manual_seed(1)
    # negative prompts of expert 0 that look like expert 0's positives
    neg_x = centers[0] + torch.randn(30, x.shape[1], generator=g)
    xs = torch.cat([x, neg_x])
    pos = torch.cat([y, torch.full((30,), -1)])
    neg = torch.cat([torch.full_like(y, -1), torch.zeros(30, dtype=torch.long)])
    without = fit_gate(x, y, rows=3).weight
    with_neg = fit_gate(xs, pos, neg, rows=3).weight
    p_without = torch.softmax(neg_x @ without.t(), 1)[:, 0].mean()
    p_with = torch.softmax(neg_x @ with_neg.t(), 1)[:, 0].mean()
    assert p_with < p_without - 0.2


def test_one_row_sigmoid_gate_for_a_shared_expert():
    x, y, _ = _clusters()
    owner = y.clone()  # pretend each cluster is one prompt: 0 = the shared expert's, 1 and 2 = routed experts'
    rows, pos, neg = shared_labels(owner, shared_pos=[0], shared_neg=[], routed_pos=[[1], [0, 2]])
    assert set(pos[pos >= 0].tolist()) == {0} and set(neg[neg >= 0].tolist()) == {0}
    assert (pos >= 0).sum() == 60 and (neg >= 0).sum() == 120  # a prompt shared with a routed expert stays positive
    gate = fit_gate(x[rows], pos, neg, rows=1, kind="sigmoid").weight
    assert gate.shape == (1, x.shape[1])
    opened = torch.sigmoid(x @ gate.t())[:, 0]
    assert opened[y == 0].min() > 0.5 and opened[y != 0].max() < 0.5


def _capture_router_inputs(base, prompts, mlp_from=None):
    """Reference: the output of every layer's post_attention_layernorm, one prompt at a time, bos dropped, in
    the base model (with the MLPs of `mlp_from`, if given). Returns per layer (tokens, hidden), and each
    token's prompt index."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if mlp_from is not None:
        donor = AutoModelForCausalLM.from_pretrained(mlp_from, dtype=torch.float32).state_dict()
        model.load_state_dict({k: v for k, v in donor.items() if ".mlp." in k}, strict=False)
    layers = model.model.layers
    per_layer = [[] for _ in layers]
    hooks = [l.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: per_layer[i].append(o[0, 1:]))
             for i, l in enumerate(layers)]
    sizes = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(tok.bos_token + p, add_special_tokens=False, return_tensors="pt")
            model(**ids)
            sizes.append(ids["input_ids"].shape[1] - 1)
    for h in hooks:
        h.remove()
    owner = torch.arange(len(prompts)).repeat_interleave(torch.tensor(sizes))
    return [torch.cat(chunks) for chunks in per_layer], owner


def _routers(out, layers=2):
    t = read_tensors(out)
    return torch.stack([t[f"model.layers.{l}.block_sparse_moe.gate.weight"] for l in range(layers)])


def test_fitted_build_matches_a_reference_fit_and_routes_prompts_to_their_expert(models, out, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="fitted")
    cfg["experts"][0]["negative_prompts"] = ["Once upon"]
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32", prompt_batch_size=2)
    got = _routers(out)

    # positives run through the base with their expert's MLPs; negatives through the base
    code_x, code_owner = _capture_router_inputs(models["base"], CODE, mlp_from=models["code"])
    story_x, story_owner = _capture_router_inputs(models["base"], STORY, mlp_from=models["story"])
    neg_x, neg_owner = _capture_router_inputs(models["base"], ["Once upon"])
    layers = [torch.cat(parts) for parts in zip(code_x, story_x, neg_x)]
    n_code, n_story, n_neg = len(code_owner), len(story_owner), len(neg_owner)
    label_pos = torch.tensor([0] * n_code + [1] * n_story + [-1] * n_neg)
    label_neg = torch.tensor([-1] * (n_code + n_story) + [0] * n_neg)
    for l in range(2):
        ref = fit_gate(layers[l], label_pos, label_neg, rows=2).weight
        assert torch.allclose(got[l], ref, atol=2e-3 * ref.abs().max()), (got[l] - ref).abs().max()
        z = layers[l] @ got[l].t()
        own = label_pos >= 0
        assert (z[own].argmax(1) == label_pos[own]).float().mean() > 0.9

    moeforge.build(cfg, tmp_path / "again", quiet=True, hidden_dtype="float32", prompt_batch_size=3)
    assert torch.allclose(_routers(tmp_path / "again"), got, atol=2e-3 * got.abs().max())  # batching barely matters


def test_fitted_shared_expert_rows(models):
    """Rows from num_routed on are one-row sigmoid gates: open on the shared expert's prompts, closed elsewhere."""
    from moeforge.config import Expert
    from moeforge.gates import GateInputs, compute_gates
    from moeforge.options import BuildOptions
    from moeforge.sources.open_model import open_checkpoint

    experts = [Expert(source_model="a", positive_prompts=CODE), Expert(source_model="b", positive_prompts=STORY),
               Expert(source_model="s", positive_prompts=["Das ist ein Satz auf Deutsch", "Solve for x: 2x + 3 = 7"])]
    base = open_checkpoint(models["base"])
    try:
        gates = compute_gates("fitted", GateInputs(base, experts, 2, 32, 0, BuildOptions(hidden_dtype="float32", quiet=True),
                                                   num_routed=2))
    finally:
        base.close()
    assert gates.shape == (2, 3, 32)
    prompts = CODE + STORY + list(experts[2].positive_prompts)
    layers, owner = _capture_router_inputs(models["base"], prompts)
    for l, x in enumerate(layers):
        opened = torch.sigmoid(x @ gates[l, 2])
        assert opened[owner >= 4].mean() > 0.6 and opened[owner < 4].mean() < 0.4
        assert gates[l, :2].sum(0).abs().max() < 1e-3 * gates[l, :2].abs().max()  # a softmax pair, as before


def test_base_model_loaded_once_and_freed_before_writing(models, out, monkeypatch):
    import transformers

    import moeforge.writer

    loaded = []
    real_load = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting_load(cls, *args, **kwargs):
        model = real_load(cls, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    real_write = moeforge.writer.write_sharded
    alive_at_write = []

    def checking_write(*args, **kwargs):
        import gc

        gc.collect()
        alive_at_write.append([ref() is not None for ref in loaded])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting_load))
    monkeypatch.setattr(moeforge.writer, "write_sharded", checking_write)
    cfg = expert_config(models["base"], [models["code"], models["story"], models["code"]], gate_mode="fitted")
    cfg["experts"][2]["positive_prompts"] = ["Solve for x", "Das ist ein Satz"]
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32", prompt_batch_size=2)
    assert len(loaded) == 1  # one load for three experts and seven prompts
    assert alive_at_write == [[False]]


@pytest.fixture
def moeforge_warnings():
    """Warnings of the moeforge logger, collected by a handler of our own (whatever the logger's propagation
    and pytest's own capture handlers)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    log, handler = logging.getLogger("moeforge"), Collect(logging.WARNING)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.mark.parametrize("mode", ["hidden", "fitted", "cheap_embed"])
def test_near_duplicate_prompts_warn_naming_the_experts(models, out, mode, moeforge_warnings):
    cfg = expert_config(models["base"], [models["code"], models["story"], models["code"]], gate_mode=mode)
    cfg["experts"][2]["positive_prompts"] = list(CODE)  # same prompts as expert 0
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32")
    dupes = [r.getMessage() for r in moeforge_warnings if "near-duplicate" in r.getMessage()]
    assert len(dupes) == 1 and "experts 0 (" in dupes[0] and "and 2 (" in dupes[0] and "all layers" in dupes[0]
    assert "1 (" not in dupes[0].split("and 2")[0].replace("experts 0 (", "")


def test_distinct_prompts_do_not_warn(models, out, moeforge_warnings):
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="fitted")
    moeforge.build(cfg, out, quiet=True, hidden_dtype="float32")
    assert not [r for r in moeforge_warnings if "near-duplicate" in r.getMessage() or "degenerate" in r.getMessage()]
