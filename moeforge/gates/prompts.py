"""Prompt tokenization as mergekit-moe does it, and the token-embedding encoder of `cheap_embed`."""
from __future__ import annotations

import logging
from typing import List, Optional

from moeforge.errors import SourceError

log = logging.getLogger("moeforge")


def load_tokenizer(inputs):
    return load_tokenizer_at(inputs.base.path, inputs.base.label, inputs.options.trust_remote_code)


def load_tokenizer_at(path, label: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise SourceError(f"{label}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
    return tok


def tokenize(tok, prompts: List[str], rows: Optional[int] = None, context: Optional[int] = None) -> List[List[int]]:
    """As mergekit-moe: bos_token + prompt, no other special tokens. With `rows` (the embedding's), a token id
    outside it is one clear error; with `context`, a longer prompt keeps its bos and its last tokens."""
    bos = tok.bos_token or ""
    result = tok([bos + p for p in prompts], add_special_tokens=False)["input_ids"]
    too_long = 0
    for n, (prompt, ids) in enumerate(zip(prompts, result)):
        if rows is not None:
            bad = next((i for i in ids if not 0 <= i < rows), None)
            if bad is not None:
                raise SourceError(
                    f"prompt {_short(prompt)}: token id {bad} ({tok.convert_ids_to_tokens(bad)!r}) is outside the base "
                    f"model's embedding ({rows} rows): its tokenizer does not match its weights"
                )
        if context is not None and len(ids) > context:
            keep = 1 if bos and context > 1 else 0
            result[n] = ids[:keep] + ids[len(ids) - (context - keep):]
            too_long += 1
    if too_long:
        log.warning("%d prompt(s) longer than the base model's context (%d tokens): only their last tokens are used",
                    too_long, context)
    return result


def pad_id(tok, rows: int) -> int:
    """An id to fill padded positions with: any row of the embedding does, behind the attention mask. The
    tokenizer's own pad can lie outside it (some Qwen2 tokenizers)."""
    return next((i for i in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) if i is not None and 0 <= i < rows), 0)


def _short(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 40 else prompt[:37] + "...")


def cheap_embedding_encoder(inputs):
    """Sum of the prompts' token embeddings, unit-normalised, the same for every layer."""
    import torch

    tok = load_tokenizer(inputs)
    embedding_rows = inputs.base.ref(inputs.embed_name).shape[0]
    rows = {}

    def embedding_row(token_id: int):
        if token_id not in rows:
            rows[token_id] = inputs.base.load_rows(inputs.embed_name, token_id, token_id + 1)[0].float()
        return rows[token_id]

    def encode(prompts: List[str]):
        total = torch.zeros(inputs.hidden_size)
        for ids in tokenize(tok, prompts, embedding_rows):
            for i in ids:
                total += embedding_row(i)
        vec = total / total.norm().clamp(min=1e-8)
        return vec.expand(inputs.num_layers, -1)

    return encode
