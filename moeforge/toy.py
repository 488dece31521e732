"""Tiny dense models and tokenizers made locally, for the demo, the tests and the benchmarks (no network)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_CORPUS = (
    "def add(a, b): return a + b",
    "Write a Python function that sorts a list",
    "Once upon a time there was a dragon",
    "The patient has a fever and a cough",
    "Das ist ein Satz auf Deutsch",
    "Solve for x: 2x + 3 = 7",
)


def make_tokenizer(out_dir: Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 256, bos: bool = True):
    """A byte-level BPE tokenizer trained on `corpus`, saved as a transformers fast tokenizer.
    `bos=False` makes one without a bos token, like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_dense(
    out_dir: Path,
    family: str = "llama",
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    dtype: str = "float32",
    tokenizer_corpus: Sequence[str] = DEFAULT_CORPUS,
    train_texts: Optional[Sequence[str]] = None,
    train_steps: int = 0,
    init_from: Optional[Path] = None,
    max_shard_size: Optional[str] = None,
    bin_format: bool = False,
    train_batch_size: Optional[int] = None,
    bos: bool = True,
    vocab_size: int = 256,
    **config_overrides,
):
    """Save a small dense causal LM (random init, or `init_from`, plus a few training steps) with its tokenizer."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir, tokenizer_corpus, vocab_size=vocab_size, bos=bos)
    torch.manual_seed(seed)
    if init_from is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(init_from), dtype=torch.float32)
    else:
        config_class = transformers.CONFIG_MAPPING[family]  # `family`: a model_type of moeforge.families
        if family in ("qwen3", "gemma", "gemma2"):
            config_overrides.setdefault("head_dim", hidden_size // 4)
        config_overrides.setdefault("max_position_embeddings", 256)
        config = config_class(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **config_overrides,
        )
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if train_texts and train_steps:
        train(model, tok, train_texts, train_steps, batch_size=train_batch_size)
    model.to(getattr(torch, dtype))
    model.generation_config.max_new_tokens = 16
    if bin_format:
        model.config.save_pretrained(str(out_dir))
        model.generation_config.save_pretrained(str(out_dir))
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "pytorch_model.bin")
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(out_dir), **kwargs)
    return model


def train(model, tok, texts: Sequence[str], steps: int, lr: float = 3e-3, batch_size: Optional[int] = None) -> float:
    """A few steps of next-token training, enough to make experts differ from their base.

    Full batch by default; with `batch_size`, each step takes the next slice of the texts, cycling."""
    import torch

    model.train()
    texts = list(texts)
    size = batch_size or len(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = None
    for step in range(steps):
        start = (step * size) % len(texts)
        chunk = (texts + texts)[start:start + size]
        batch = tok([(tok.bos_token or "") + t for t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach()) if loss is not None else float("nan")


# Four synthetic tasks that share one vocabulary and look different: the demo and the routing benchmark train
# one expert on each.
_NAMES = ["add", "mul", "sub", "scale", "shift", "clip", "norm", "step", "area", "sum_up"]
_OPS = ["+", "-", "*", "//", "%"]
_NOUNS = ["dragon", "knight", "girl", "king", "fox", "witch", "sailor", "baker", "wolf", "queen"]
_ADJS = ["old", "brave", "small", "dark", "quiet", "clever", "tired", "happy", "strange", "wild"]
_VERBS = ["found", "chased", "helped", "watched", "followed", "met", "fed", "called", "feared", "saved"]
_PLACES = ["forest", "castle", "river", "village", "mountain", "harbor", "garden", "cave"]
_NOMEN = ["Hund", "Katze", "Mann", "Frau", "Kind", "Lehrer", "Vogel", "Baum", "Stadt", "Freund"]
_ADJ_DE = ["alte", "kleine", "schnelle", "gute", "neue", "dunkle", "ruhige", "starke"]
_VERB_DE = ["sieht", "findet", "ruft", "hilft", "kennt", "sucht", "liebt", "fragt"]
_ORT = ["im Wald", "in der Stadt", "am Fluss", "zu Hause", "im Garten", "auf dem Berg"]


def code(r: random.Random) -> str:
    n, op, k = r.choice(_NAMES), r.choice(_OPS), r.randint(1, 99)
    return r.choice([
        f"def {n}(x): return x {op} {k}",
        f"for i in range({k}): print(i {op} {r.randint(1, 9)})",
        f"if x > {k}: x = {n}(x {op} {r.randint(1, 9)})",
        f"while n < {k}: n = n {op} {r.randint(2, 9)}",
    ])


def math(r: random.Random) -> str:
    a, b = r.randint(1, 99), r.randint(1, 99)
    op = r.choice(["+", "-", "*"])
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return r.choice([f"{a} {op} {b} = {c}", f"Solve: {a} {op} {b} = {c}", f"We get {a} {op} {b} = {c}."])


def story(r: random.Random) -> str:
    return r.choice([
        f"The {r.choice(_ADJS)} {r.choice(_NOUNS)} {r.choice(_VERBS)} the {r.choice(_NOUNS)} in the {r.choice(_PLACES)}.",
        f"Once upon a time a {r.choice(_ADJS)} {r.choice(_NOUNS)} lived near the {r.choice(_PLACES)}.",
        f"One day the {r.choice(_NOUNS)} {r.choice(_VERBS)} a {r.choice(_ADJS)} {r.choice(_NOUNS)}.",
    ])


def german(r: random.Random) -> str:
    return r.choice([
        f"Der {r.choice(_ADJ_DE)} {r.choice(_NOMEN)} {r.choice(_VERB_DE)} den {r.choice(_NOMEN)} {r.choice(_ORT)}.",
        f"Heute {r.choice(_VERB_DE)} die {r.choice(_ADJ_DE)} {r.choice(_NOMEN)} einen {r.choice(_NOMEN)}.",
        f"Ich glaube, das {r.choice(_ADJ_DE)} {r.choice(_NOMEN)} ist {r.choice(_ORT)}.",
    ])


TASKS = {"code": code, "math": math, "story": story, "german": german}


def texts(task: str, count: int, seed: int):
    r = random.Random(f"{task}:{seed}")
    return [TASKS[task](r) for _ in range(count)]
