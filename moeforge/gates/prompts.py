"""Prompt tokenization as mergekit-moe does it, and the token-embedding encoder of `cheap_embed`."""
from __future__ import annotations

from typing import List

from moeforge.errors import SourceError


def load_tokenizer(inputs):
    return load_tokenizer_at(inputs.base.path, inputs.base.label, inputs.options.trust_remote_code)


def load_tokenizer_at(path, label: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise SourceError(f"{label}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    if tok.pad_token_id is None:  # in memory only; padding is masked out
        tok.pad_token_id = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
    return tok


def tokenize(tok, prompts: List[str]):
    """As mergekit-moe: bos_token + prompt, no other special tokens."""
    return tok([(tok.bos_token or "") + p for p in prompts], add_special_tokens=False)["input_ids"]


def cheap_embedding_encoder(inputs):
    """Sum of the prompts' token embeddings, unit-normalised, the same for every layer."""
    import torch

    tok = load_tokenizer(inputs)
    rows = {}

    def embedding_row(token_id: int):
        if token_id not in rows:
            rows[token_id] = inputs.base.load_rows(inputs.embed_name, token_id, token_id + 1)[0].float()
        return rows[token_id]

    def encode(prompts: List[str]):
        total = torch.zeros(inputs.hidden_size)
        for ids in tokenize(tok, prompts):
            for i in ids:
                total += embedding_row(i)
        vec = total / total.norm().clamp(min=1e-8)
        return vec.expand(inputs.num_layers, -1)

    return encode
