"""One checkpoint for every transformers version: outputs built under transformers 5 load in transformers 4.57
(the real reader, in a second venv: tests/tf4_venv.py) as the same model, and a build under 4.57 writes the same
bytes.

The venv is made on first use (about 2-7 minutes, mostly pip; reused afterwards). If it cannot be made the tests
fail with pip's message; set MOEFORGE_SKIP_TF4=1 to skip them instead.
"""
import copy
import dataclasses
import json
import os
import subprocess

import pytest
import tf4_venv
import torch
from conftest import CODE, STORY
from helpers import read_tensors

import moeforge
from moeforge.layouts import MoEShape, layout_named

# long enough that the RoPE base and scaling show in the logits (positions up to ~90)
TEXTS = ("Write a Python function that sorts a list. def add(a, b): return a + b. Solve for x: 2x + 3 = 7. "
         "Once upon a time there was a dragon. The patient has a fever and a cough.",
         "Once upon a time there was a dragon. Das ist ein Satz auf Deutsch.")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}
LAYOUTS = ("mixtral", "mixtral-hub-config", "qwen", "qwen3", "deepseek")
VERSION_FIELDS = ("transformers_version",)
SHAPE = MoEShape(num_experts=4, experts_per_token=2, intermediate_size=64)
BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 260,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def _spellings(rope):
    """One base config as transformers 5 saves it and as 4.x saves it (Llama-3's on the Hub)."""
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
    new = {**BASE, "rope_parameters": rope, "dtype": "float32", "transformers_version": "5.24.0"}
    old = {**BASE, "rope_theta": rope["rope_theta"], "rope_scaling": None if rope["rope_type"] == "default" else legacy,
           "torch_dtype": "float32", "transformers_version": "4.44.0"}
    return new, old


@pytest.mark.parametrize("layout", ["mixtral", "qwen", "qwen3"])
@pytest.mark.parametrize("rope", [LLAMA3_ROPE, YARN_ROPE, {"rope_type": "default", "rope_theta": 500000.0}])
def test_config_has_the_bases_rope_in_both_spellings_whichever_it_came_in(layout, rope):
    new, old = (layout_named(layout).model_config(c, SHAPE, "float32") for c in _spellings(rope))
    assert new == old
    assert new["rope_parameters"] == rope and new["rope_theta"] == rope["rope_theta"]
    scaling = new["rope_scaling"]
    if rope["rope_type"] == "default":
        assert scaling is None
    else:
        assert scaling == {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    assert "transformers_version" not in new and new["dtype"] == new["torch_dtype"] == "float32"


def test_config_is_the_base_plus_the_layouts_keys_not_the_installed_classs_defaults():
    config = layout_named("mixtral").model_config(_spellings(LLAMA3_ROPE)[0], SHAPE, "bfloat16")
    assert set(config) == set(BASE) | {"num_local_experts", "num_experts_per_tok", "head_dim", "rope_theta",
                                       "rope_scaling", "rope_parameters", "dtype", "torch_dtype"}


def test_longrope_pretraining_length_is_also_where_transformers4_reads_it():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    config = layout_named("mixtral").model_config({**BASE, "rope_parameters": rope}, SHAPE, "float32")
    assert config["original_max_position_embeddings"] == 64 and config["rope_parameters"] == rope


def test_qwen3_moe_expert_count_is_written_under_both_names():
    layout = layout_named("qwen3")
    config = layout.model_config(_spellings(YARN_ROPE)[0], SHAPE, "float32")
    assert config["num_experts"] == config["num_local_experts"] == 4  # 4.x reads the first, 5.x writes the second
    config = layout.model_config(config, dataclasses.replace(SHAPE, num_experts=5), "float32")  # as add-expert
    assert config["num_experts"] == config["num_local_experts"] == 5


@pytest.fixture(scope="module")
def tf4_python():
    if os.environ.get("MOEFORGE_SKIP_TF4"):
        pytest.skip("MOEFORGE_SKIP_TF4 is set: the transformers 4.57 venv is not made")
    try:
        return tf4_venv.ensure()
    except RuntimeError as e:
        pytest.fail(f"{e}\n(set MOEFORGE_SKIP_TF4=1 to skip the transformers 4.57 tests)", pytrace=False)


def _portable_tokenizer(model_dir):
    """transformers 5 saves the toy tokenizer as `TokenizersBackend`, a class 4.x lacks; both read the tokenizer
    under its 4.x name. (Outputs copy the base's tokenizer files unaltered.)"""
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def _hub_spelling(src, dst):
    """The same model with config.json as transformers 4.x writes it (Llama-3's on the Hub: rope_theta and
    rope_scaling, no rope_parameters)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.44.0"
    (dst / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Dense bases made under transformers 5, each with two trained variants: a Llama-3 style RoPE (theta
    500000, llama3 scaling), Qwen3 with YaRN, and plain RoPE with theta 500000 (DeepSeek takes no scaling)."""
    from moeforge.toy import make_dense

    root = tmp_path_factory.mktemp("tf4_bases")
    kinds = {"llama3": {"rope_parameters": LLAMA3_ROPE}, "qwen3": {"family": "qwen3", "rope_parameters": YARN_ROPE},
             "theta": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}}
    paths = {}
    for i, (kind, kwargs) in enumerate(kinds.items()):
        base = paths[kind] = root / kind
        make_dense(base, seed=10 + i, initializer_range=0.2, **kwargs)  # large enough weights that RoPE shows
        for name, texts in (("code", CODE), ("story", STORY)):
            paths[f"{kind}_{name}"] = root / f"{kind}_{name}"
            make_dense(paths[f"{kind}_{name}"], init_from=base, train_texts=texts, train_steps=4)
    for path in paths.values():
        _portable_tokenizer(path)
    paths["llama3_hub"] = root / "llama3_hub"
    _hub_spelling(paths["llama3"], paths["llama3_hub"])
    return {k: str(v) for k, v in paths.items()}


def _recipes(bases, layout):
    """(identical-experts recipe, different-experts recipe, the dense base) for one layout."""
    kind = {"mixtral": "llama3", "mixtral-hub-config": "llama3", "qwen": "llama3", "qwen3": "qwen3",
            "deepseek": "theta"}[layout]
    base = bases["llama3_hub"] if layout == "mixtral-hub-config" else bases[kind]
    code, story = bases[f"{kind}_code"], bases[f"{kind}_story"]
    arch = layout.split("-")[0]

    def recipe(experts, gate_mode, shared=None):
        r = {"base_model": base, "architecture": arch, "gate_mode": gate_mode, "dtype": "float32",
             "experts": [{"source_model": e, "positive_prompts": p} for e, p in zip(experts, (CODE, STORY))]}
        if shared:
            r["shared_experts"] = shared
        return r

    shared_same = [{"source_model": base, "residual_scale": 0.0, "positive_prompts": ["Solve for x"]}]
    shared_other = [{"source_model": code, **({"positive_prompts": ["Solve for x"]} if arch == "qwen" else {})}]
    same = recipe([base, base], "random", shared_same if arch == "qwen" else None)
    other = recipe([code, story], "hidden", shared_other if arch in ("qwen", "deepseek") else None)
    return same, other, base


def _tf5_logits(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    batch = tok(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)


def _loadable_offline(out) -> bool:
    """Whether every module config.json's auto_map names lies beside the weights (DeepSeek's remote code)."""
    auto_map = json.loads((out / "config.json").read_text()).get("auto_map") or {}
    return all("--" not in ref and (out / (ref.rsplit(".", 1)[0] + ".py")).is_file() for ref in auto_map.values())


@pytest.fixture(scope="module")
def runs(tf4_python, bases, tmp_path_factory):
    """Every layout built under transformers 5 (identical and different experts) and, with the different
    experts, under 4.57; the transformers 5 references; then one 4.57 process that builds and loads."""
    root = tmp_path_factory.mktemp("tf4_out")
    cases, load, build = {}, [], []
    for layout in LAYOUTS:
        same, other, base = _recipes(bases, layout)
        case = {"base": base, "same": root / f"{layout}_same", "other": root / f"{layout}_other",
                "other_tf4": root / f"{layout}_other_tf4"}
        moeforge.build(copy.deepcopy(same), case["same"], quiet=True, allow_all_same=True, random_seed=0)
        moeforge.build(copy.deepcopy(other), case["other"], quiet=True, random_seed=0)
        build.append([other, str(case["other_tf4"])])
        case["offline"] = _loadable_offline(case["same"])
        if case["offline"]:
            case["dense_tf5"] = _tf5_logits(base)
            case["other_tf5"] = _tf5_logits(case["other"])
            load += [str(case["same"]), str(case["other"])]
        cases[layout] = case
    job, result = root / "job.json", root / "result.pt"
    job.write_text(json.dumps({"texts": TEXTS, "build": build, "load": load}))
    env = {**os.environ, "PYTHONPATH": str(tf4_venv.ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}  # moeforge from this work tree
    script = tf4_venv.ROOT / "tests" / "tf4_run.py"
    done = subprocess.run([str(tf4_python), str(script), str(job), str(result)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"transformers 4.57 run failed:\n{done.stderr[-4000:]}"
    return cases, torch.load(result, weights_only=False)


def _in_tf4(result, path):
    """What transformers 4.57 made of one checkpoint: its logits and config attributes, or the test fails."""
    error = result["errors"].get(str(path))
    if error:
        pytest.fail(f"{path.name} in transformers {result['version']}: {error}", pytrace=False)
    return result["logits"][str(path)], result["config"][str(path)]


def _case(runs, layout):
    cases, result = runs
    case = cases[layout]
    if not case["offline"]:
        pytest.skip(f"{layout}: the output's auto_map names modeling code that is not beside the weights "
                    f"(DeepSeek-MoE's own configuration/modeling code, issue 15.3), so it cannot load offline")
    assert result["version"].startswith("4.57."), result["version"]
    return case, result


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_identical_experts_reproduce_the_dense_base_in_transformers4(runs, layout):
    case, result = _case(runs, layout)
    logits, _ = _in_tf4(result, case["same"])
    diff = (logits - case["dense_tf5"]).abs().max().item()
    print(f"\n{layout}, identical experts: transformers {result['version']} vs the dense base: {diff:.3g}")
    assert diff <= 1e-4, f"{layout}: transformers {result['version']} differs from the dense base by {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_different_experts_match_transformers5_in_transformers4(runs, layout):
    case, result = _case(runs, layout)
    logits, _ = _in_tf4(result, case["other"])
    assert (case["other_tf5"] - case["dense_tf5"]).abs().max().item() > 1e-2  # the experts do change the model
    diff = (logits - case["other_tf5"]).abs().max().item()
    print(f"\n{layout}, different experts: transformers {result['version']} vs 5.x: {diff:.3g}")
    assert diff <= 1e-4, f"{layout}: transformers {result['version']} differs from transformers 5 by {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mixtral", "mixtral-hub-config", "qwen", "qwen3"])
def test_transformers4_reads_the_bases_rope_and_expert_count(runs, bases, layout):
    case, result = _case(runs, layout)
    _, read = _in_tf4(result, case["same"])
    rope = YARN_ROPE if layout == "qwen3" else LLAMA3_ROPE
    assert read["rope_theta"] == rope["rope_theta"], read
    assert {k: (read["rope_scaling"] or {}).get(k) for k in rope if k != "rope_theta"} == \
        {k: v for k, v in rope.items() if k != "rope_theta"}
    count_key = layout_named(layout.split("-")[0]).expert_count_key
    assert read[count_key] == 2, read


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_build_under_transformers4_writes_the_same_bytes(runs, layout):
    cases, result = runs
    case = cases[layout]
    error = result["errors"].get(str(case["other_tf4"]))
    assert not error, f"{layout}: the build under transformers {result['version']} failed: {error}"
    mine, theirs = read_tensors(case["other"]), read_tensors(case["other_tf4"])
    assert sorted(mine) == sorted(theirs)
    differ = [n for n in mine if mine[n].dtype != theirs[n].dtype or mine[n].shape != theirs[n].shape
              or not torch.equal(mine[n].view(torch.uint8), theirs[n].view(torch.uint8))]
    assert not differ, f"{layout}: tensors differ between builds under transformers 5 and 4.57: {differ[:5]}"

    def config(out):
        data = json.loads((out / "config.json").read_text())
        return {k: v for k, v in data.items() if k not in VERSION_FIELDS}

    assert config(case["other"]) == config(case["other_tf4"])
