"""The bad-input corpus: every case fails with a non-zero exit, exactly one stderr line naming the field or
file and the problem, no traceback, nothing at OUT (nor beside it), and source files left byte for byte.

Cases run in-process through click's CliRunner (the CLI path users take, minus the interpreter start-up);
signals and resource limits, which need a real process, are in test_interrupts.py.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import CODE, expert_config

from moeforge.cli import cli

CASES = {}


def case(code, *needles):
    """Register a case: fn(ctx) -> CLI args; it must exit `code` with every needle in its one stderr line."""

    def register(fn):
        CASES[fn.__name__] = (fn, code, needles)
        return fn

    return register


class Ctx:
    def __init__(self, models, tmp: Path):
        self.models, self.tmp = models, tmp
        self.out = tmp / "out"
        self.src = tmp / "src"
        self.src.mkdir()

    def cfg(self, experts=("code", "story"), base="base", **changes):
        cfg = expert_config(self.path(base), [self.path(e) for e in experts], gate_mode="random")
        cfg.update(changes)
        return cfg

    def path(self, name) -> str:
        """A clone made by the case (or any name under src/) shadows the session model of that name."""
        return str(self.src / name) if (self.src / name).exists() or name not in self.models else self.models[name]

    def clone(self, name, as_name=None) -> Path:
        dst = self.src / (as_name or name)
        shutil.copytree(self.models[name], dst)
        return dst

    def build(self, cfg, *extra):
        path = self.tmp / "moe.yml"
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
        return ["build", path, self.out, *extra]


def edit_tensors(model_dir: Path, fn, file="model.safetensors"):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / file))
    fn(tensors)
    save_file(tensors, str(model_dir / file), metadata={"format": "pt"})


def edit_config(model_dir: Path, **changes):
    p = model_dir / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


MLP_UP = "model.layers.1.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


# ---- config: typos, wrong types, impossible values -------------------------------------------------------
@case(2, "gate_mod", "unknown key")
def typo_top_level_key(c):
    return c.build(c.cfg(gate_mod="random"))


@case(2, "experts.0.positive_promts", "unknown key")
def typo_expert_key(c):
    cfg = c.cfg()
    cfg["experts"][0]["positive_promts"] = ["x"]
    return c.build(cfg)


@case(2, "gate_mode", "'hiden'")
def gate_mode_not_a_mode(c):
    return c.build(c.cfg(gate_mode="hiden"))


@case(2, "experts_per_token", "integer")
def experts_per_token_wrong_type(c):
    return c.build(c.cfg(experts_per_token="two"))


@case(2, "experts_per_token", ">= 1")
def experts_per_token_zero(c):
    return c.build(c.cfg(experts_per_token=0))


@case(2, "experts_per_token", "more than the 2 experts")
def experts_per_token_too_many(c):
    return c.build(c.cfg(experts_per_token=3))


@case(2, "dtype", "'float8'")
def dtype_not_supported(c):
    return c.build(c.cfg(dtype="float8"))


@case(2, "experts.1.noise_scale", "greater than or equal to 0")
def negative_noise_scale(c):
    cfg = c.cfg()
    cfg["experts"][1]["noise_scale"] = -0.5
    return c.build(cfg)


@case(2, "experts", "at least 1")
def no_experts(c):
    return c.build(c.cfg(experts=()))


@case(2, "base_model", "Field required")
def base_model_missing(c):
    cfg = c.cfg()
    del cfg["base_model"]
    return c.build(cfg)


@case(2, "moe.yml", "expected a mapping")
def config_is_a_list(c):
    return c.build("- base_model: x\n")


@case(2, "moe.yml", "line 2", "invalid YAML")
def config_is_not_yaml(c):
    return c.build("base_model: [unclosed\n")


@case(2, "nowhere.yml", "cannot read config")
def config_file_missing(c):
    return ["build", c.tmp / "nowhere.yml", c.out]


@case(2, "architecture", "'qwen9'", "not an output layout")
def unknown_architecture(c):
    return c.build(c.cfg(architecture="qwen9"))


@case(2, "experts.1.positive_prompts", "required with gate_mode 'hidden'")
def hidden_gates_without_prompts(c):
    cfg = c.cfg(gate_mode="hidden")
    del cfg["experts"][1]["positive_prompts"]
    return c.build(cfg)


@case(2, "experts", "same positive and negative prompts")
def identical_prompts(c):
    cfg = c.cfg(gate_mode="hidden")
    for e in cfg["experts"]:
        e["positive_prompts"] = CODE
    return c.build(cfg)


@case(2, "--out-shard-size", "'lots'")
def shard_size_not_a_size(c):
    return c.build(c.cfg(), "--out-shard-size", "lots")


# ---- paths -----------------------------------------------------------------------------------------------
@case(2, "missing_expert", "no such directory")
def expert_directory_missing(c):
    return c.build(c.cfg(experts=("code", "missing_expert")))


@case(2, "a_file", "is a file")
def base_model_is_a_file(c):
    (c.src / "a_file").write_text("not a model")
    return c.build(c.cfg(base="a_file"))


@case(2, "out", "exists and is a file")
def out_is_a_file(c):
    c.out.write_text("precious")
    return c.build(c.cfg())


@case(2, "blocker", "is a file, not a directory")
def out_parent_is_a_file(c):
    (c.tmp / "blocker").write_text("")
    c.out = c.tmp / "blocker" / "out"
    return c.build(c.cfg())


@case(2, "out", "not empty", "--overwrite")
def out_not_empty(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    return c.build(c.cfg())


# ---- corrupt, truncated and incomplete sources ---------------------------------------------------------------
@case(2, "model.safetensors", "truncated")
def truncated_safetensors(c):
    p = c.clone("code") / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return c.build(c.cfg())


@case(2, "model.safetensors", "unreadable safetensors header")
def header_not_json(c):
    p = c.clone("story") / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    p.write_bytes(bytes(data))
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "model.safetensors", "truncated safetensors file")
def shorter_than_a_header(c):
    (c.clone("story") / "model.safetensors").write_bytes(b"\x01\x02")
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "model.safetensors", "not a safetensors file or truncated")
def header_length_past_the_end(c):
    p = c.clone("story") / "model.safetensors"
    p.write_bytes((10**9).to_bytes(8, "little") + p.read_bytes()[8:])
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "model-00002-of", "missing")
def index_lists_a_missing_shard(c):
    d = c.clone("base_sharded")
    shard = sorted(d.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    return c.build(c.cfg(base="base_sharded"))


@case(2, "model.safetensors.index.json", "unreadable index")
def index_not_json(c):
    d = c.clone("base_sharded")
    (d / "model.safetensors.index.json").write_text("{ not json")
    return c.build(c.cfg(base="base_sharded"))


@case(2, "story", "no weights found")
def no_weight_files(c):
    (c.clone("story") / "model.safetensors").unlink()
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "config.json", "missing")
def config_json_missing(c):
    (c.clone("story") / "config.json").unlink()
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "config.json", "unreadable")
def config_json_not_json(c):
    (c.clone("story") / "config.json").write_text("{ nope")
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "model_type 'gpt2'", "not a supported input family")
def unsupported_model_type(c):
    edit_config(c.clone("story"), model_type="gpt2")
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "pytorch_model.bin", "unreadable PyTorch checkpoint")
def corrupt_bin_checkpoint(c):
    (c.clone("base_bin") / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a zip")
    return c.build(c.cfg(base="base_bin"))


@case(2, "story", "missing tensor", MLP_UP)
def expert_lacks_an_mlp_tensor(c):
    edit_tensors(c.clone("story"), lambda t: t.pop(MLP_UP))
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "base", "missing tensor 'model.norm.weight'", "config.json implies it")
def base_lacks_a_tensor(c):
    edit_tensors(c.clone("base"), lambda t: t.pop("model.norm.weight"))
    return c.build(c.cfg(base="base"))


@case(2, "base", "missing tensor 'model.layers.1.self_attn.k_proj.weight'", "layer 0 has it")
def base_layer_lacks_a_tensor(c):
    edit_tensors(c.clone("base"), lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    return c.build(c.cfg(base="base"))


@case(2, "base", "model.layers.2.input_layernorm.weight", "num_hidden_layers 2")
def base_has_more_layers_than_its_config(c):
    edit_tensors(c.clone("base"), lambda t: t.update({"model.layers.2.input_layernorm.weight": t["model.norm.weight"].clone()}))
    return c.build(c.cfg(base="base"))


@case(2, "lm_head.weight", "has shape (260, 16)", "config.json implies (260, 32)")
def base_lm_head_does_not_fit_hidden_size(c):
    edit_tensors(c.clone("base"), lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:, :16].clone()}))
    return c.build(c.cfg(base="base"))


@case(2, "model.embed_tokens.weight", "has shape (200, 32)", "config.json implies (260, 32)")
def base_embedding_rows_do_not_match_vocab(c):
    edit_tensors(c.clone("base"), lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:200].clone()}))
    return c.build(c.cfg(base="base"))


# ---- experts that do not fit the base -------------------------------------------------------------------------
@case(2, "story", "hidden_size is 48", "32")
def expert_hidden_size_differs(c):
    edit_config(c.clone("story"), hidden_size=48)
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "story", "num_hidden_layers is 3", "2")
def expert_depth_differs(c):
    edit_config(c.clone("story"), num_hidden_layers=3)
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "narrow", "intermediate size 48 differs", "64")
def experts_mlp_widths_differ(c):
    from moeforge.toy import make_dense

    make_dense(c.src / "narrow", intermediate_size=48)
    return c.build(c.cfg(experts=("code", "narrow")))


@case(2, "tokenizer.json", "has id", "base's tokenizer")
def expert_tokenizer_reassigns_ids(c):
    p = c.clone("story") / "tokenizer.json"
    tok = json.loads(p.read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, other ids: trained on other embeddings
    p.write_text(json.dumps(tok))
    return c.build(c.cfg(experts=("code", "story")))


@case(2, "mistral", "is a mistral model but the base is llama")
def mixed_families(c):
    return c.build(c.cfg(experts=("code", "mistral")))


# ---- values ------------------------------------------------------------------------------------------
@case(2, "story", "model.safetensors", MLP_UP, "1 NaN/Inf")
def nan_in_a_converted_tensor(c):
    def poison(t):
        t[MLP_UP][3, 5] = float("nan")

    edit_tensors(c.clone("story"), poison)
    return c.build(c.cfg(experts=("code", "story"), dtype="bfloat16"), "--quiet")  # converted: always checked


@case(2, "story", "model.safetensors", DOWN, "1 NaN/Inf", "nothing was written", "--no-check-finite")
def nan_in_an_expert_down_proj(c):
    def poison(t):
        t[DOWN][2, 3] = float("nan")

    edit_tensors(c.clone("story"), poison)
    return c.build(c.cfg(experts=("code", "story"), dtype="float32"), "--quiet")  # copied byte for byte


@case(2, "story", "model.safetensors", DOWN, "1 NaN/Inf")
def inf_in_a_bfloat16_source(c):
    def poison(t):
        t.update({k: v.bfloat16() for k, v in t.items()})
        t[DOWN][0, 1] = float("inf")

    edit_tensors(c.clone("story"), poison)
    return c.build(c.cfg(experts=("code", "story"), dtype="bfloat16"), "--quiet")


@case(2, "story", MLP_UP, "2 NaN/Inf")
def inf_in_a_copied_tensor_with_check_finite(c):
    def poison(t):
        t[MLP_UP][0, :2] = float("inf")

    edit_tensors(c.clone("story"), poison)
    return c.build(c.cfg(experts=("code", "story"), dtype="float32"), "--check-finite", "--quiet")  # the default


@case(2, "dtype: float16 cannot hold", "overflow", "bfloat16 or float32")
def float16_overflow(c):
    def huge(t):
        t[MLP_UP][1, 1] = 1e6

    edit_tensors(c.clone("story"), huge)
    return c.build(c.cfg(experts=("code", "story"), dtype="float16"), "--quiet")


# ---- environment ---------------------------------------------------------------------------------------
@case(1, "out", "not enough free disk space", "kB is free")
def disk_too_small(c, monkeypatch):
    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10_000 // st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny(real(p)))
    return c.build(c.cfg())


@case(2, "out", "cannot resume", "changed: config.experts.1.noise_scale")
def resume_with_a_changed_config(c, monkeypatch):
    """An interrupted build (killed after its first shard), then --resume with another config."""
    from moeforge.writer import resume

    completed = resume.BuildSession.completed

    def completed_then_interrupted(self, path):  # Ctrl-C once the first shard is recorded
        completed(self, path)
        self._shards.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.BuildSession, "completed", completed_then_interrupted)
    r = _invoke(c.build(c.cfg(), "--out-shard-size", "50KB", "--quiet"))
    assert r.exit_code == 130 and "--resume" in r.stderr and len(resume.partial_dirs(c.out)) == 1, r.stderr
    monkeypatch.setattr(resume.BuildSession, "completed", completed)
    cfg = c.cfg()
    cfg["experts"][1]["noise_scale"] = 0.01
    c.keep_partial = True
    return c.build(cfg, "--out-shard-size", "50KB", "--resume")


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree_digest(*dirs) -> dict:
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, models, tmp_path, monkeypatch):
    fn, code, needles = CASES[name]
    c = Ctx(models, tmp_path)
    c.keep_partial = False
    args = fn(c, monkeypatch) if fn.__code__.co_argcount == 2 else fn(c)
    out_before = c.out.read_bytes() if c.out.is_file() else sorted(os.listdir(c.out)) if c.out.is_dir() else None
    sources = [models[m] for m in ("base", "code", "story", "base_sharded", "base_bin", "mistral")] + [c.src]
    before = tree_digest(*sources)

    r = _invoke(args)

    assert r.exit_code == code, (r.exit_code, r.stderr, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moeforge: error: ") and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    after = c.out.read_bytes() if c.out.is_file() else sorted(os.listdir(c.out)) if c.out.is_dir() else None
    assert after == out_before  # nothing created at OUT, and an existing OUT untouched
    beside = [p.name for p in c.out.parent.iterdir() if p.name.startswith(f".{c.out.name}.")] if c.out.parent.is_dir() else []
    assert len(beside) == (1 if c.keep_partial else 0), beside  # only an interrupted build keeps its partial
    assert tree_digest(*sources) == before  # sources never touched


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


def test_verbose_shows_the_traceback(models, tmp_path):
    c = Ctx(models, tmp_path)
    r = _invoke(c.build(c.cfg(experts=("code", "nowhere")), "-v"))
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_expert_with_added_tokens_builds_with_a_warning(models, tmp_path):
    """Tokens an expert added (chat markers) do not exist in the MoE: worth a warning, not a refusal."""
    c = Ctx(models, tmp_path)
    p = c.clone("story") / "tokenizer.json"
    tok = json.loads(p.read_text())
    tok["added_tokens"].append({"id": 4000, "content": "<|im_start|>", "special": True})
    p.write_text(json.dumps(tok))
    r = _invoke(c.build(c.cfg(), "--random-seed", "1"))
    assert r.exit_code == 0, r.stderr
    assert "1 token(s) the base's tokenizer lacks (e.g. '<|im_start|>')" in r.stderr
