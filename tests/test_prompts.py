"""Prompts that mergekit-moe takes build here too: any pad id, tokenizers without special tokens, empty, long and
non-Latin prompts. Each either builds or stops with one clear line."""
import pytest
from transformers import AutoTokenizer

import moeforge
from moeforge.errors import MoeforgeError
from moeforge.toy import make_dense

PROMPTS = [["Write a Python function", "def add(a, b): return a + b and more words here"],
           ["Once upon a time", "The knight rode into the dark forest at night"]]


def _pair(root, family="qwen2", **kwargs):
    base = root / f"{family}-base"
    make_dense(base, family=family, seed=0, **kwargs)
    make_dense(root / f"{family}-other", family=family, seed=1, **kwargs)
    return base, root / f"{family}-other"


def _config(base, other, gate_mode="hidden", prompts=PROMPTS, **extra):
    return {"base_model": str(base), "gate_mode": gate_mode, "dtype": "float32", **extra,
            "experts": [{"source_model": str(m), "positive_prompts": p} for m, p in zip((base, other), prompts)]}


def _retokenize(model_dir, **special):
    """Rewrite the saved tokenizer's special tokens (None removes one), leaving the weights alone."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for name, value in special.items():
        if value is None:
            setattr(tok, name, None)
        else:
            tok.add_special_tokens({name: value})
    tok.save_pretrained(str(model_dir))
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "fitted"])
def test_pad_id_outside_the_embedding(tmp_path, gate_mode):
    """A Qwen2 tokenizer whose pad token has no embedding row: batches are padded with an id inside it."""
    base, other = _pair(tmp_path, bos=False)
    tok = _retokenize(base, pad_token="<|pad_beyond|>")
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        assert tok.pad_token_id >= f.get_slice("model.embed_tokens.weight").get_shape()[0]
    shared = [{"source_model": str(base), "positive_prompts": ["Hello", "A longer prompt for the shared expert"]}]
    moeforge.build(_config(base, other, gate_mode, shared_experts=shared), tmp_path / "out", quiet=True, random_seed=0)
    assert (tmp_path / "out" / "config.json").exists()


def test_pad_does_not_change_the_routers(tmp_path):
    """What fills the padded positions is masked out: the routers do not depend on it."""
    base, other = _pair(tmp_path, family="llama")
    moeforge.build(_config(base, other), tmp_path / "a", quiet=True, random_seed=0, prompt_batch_size=1)
    moeforge.build(_config(base, other), tmp_path / "b", quiet=True, random_seed=0, prompt_batch_size=16)
    from helpers import read_tensors

    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    for name in a:
        if name.endswith("gate.weight"):
            assert (a[name] - b[name]).abs().max() < 1e-5, name


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "fitted"])
def test_tokenizer_without_pad_bos_or_eos(tmp_path, gate_mode):
    base, other = _pair(tmp_path, family="llama")
    tok = _retokenize(base, pad_token=None, bos_token=None, eos_token=None)
    assert tok.pad_token is None and tok.bos_token is None and tok.eos_token is None
    moeforge.build(_config(base, other, gate_mode), tmp_path / "out", quiet=True, random_seed=0)


@pytest.mark.parametrize("bos", [True, False])
def test_empty_prompts(tmp_path, caplog, bos):
    """With a bos token an empty prompt is the bos alone (as mergekit-moe); without one it is skipped, said once."""
    base, other = _pair(tmp_path, family="llama", bos=bos)
    prompts = [["", "Write a Python function"], ["Once upon a time", ""]]
    moeforge.build(_config(base, other, prompts=prompts), tmp_path / "out", random_seed=0)
    ignored = [r for r in caplog.records if "empty prompt" in r.getMessage()]
    assert len(ignored) == (0 if bos else 1)


def test_only_empty_prompts_without_bos_is_one_clear_error(tmp_path):
    base, other = _pair(tmp_path, family="llama", bos=False)
    with pytest.raises(MoeforgeError, match="has a token"):
        moeforge.build(_config(base, other, prompts=[[""], [" "]]), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gate_mode", ["hidden", "fitted"])
def test_prompt_longer_than_the_context(tmp_path, caplog, gate_mode):
    base, other = _pair(tmp_path, family="llama", max_position_embeddings=16)
    long = " ".join(["Once upon a time there was a dragon"] * 20)
    moeforge.build(_config(base, other, gate_mode, prompts=[["Write a Python function"], [long]]), tmp_path / "out",
                   random_seed=0)
    assert any("longer than the base model's context (16 tokens)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_non_latin_prompts(tmp_path, gate_mode):
    base, other = _pair(tmp_path, family="llama")
    prompts = [["写一个 Python 函数", "Напиши функцию"], ["كان يا ما كان", "昔々あるところに"]]
    moeforge.build(_config(base, other, gate_mode, prompts=prompts), tmp_path / "out", quiet=True, random_seed=0)


def test_token_outside_the_embedding_is_one_clear_error(tmp_path):
    """A tokenizer that does not match its weights: named, not an IndexError."""
    base, other = _pair(tmp_path, family="llama")
    _retokenize(base, bos_token="<|bos_beyond|>")
    with pytest.raises(MoeforgeError, match=r"token id \d+ .* is outside the base model's embedding"):
        moeforge.build(_config(base, other), tmp_path / "out", quiet=True)
