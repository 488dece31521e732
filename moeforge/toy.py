"""Tiny dense models and tokenizers made locally, for the demo, the tests and the benchmarks (no network)."""
from __future__ import annotations

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
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
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
        config = config_class(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
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
