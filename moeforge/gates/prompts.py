"""Prompt encoders: token embeddings (cheap_embed) and the base model's hidden states (hidden modes)."""
from __future__ import annotations

import gc
from typing import List

from moeforge.errors import ConfigError, SourceError


def load_tokenizer(inputs):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(inputs.base.path), trust_remote_code=inputs.options.trust_remote_code)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise SourceError(f"{inputs.base.label}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
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


def resolve_device(device: str):
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device} requested but no CUDA device is available")
    return device


class HiddenStateEncoder:
    """The base model's residual stream entering each layer, at each prompt's real last token (or averaged)."""

    def __init__(self, inputs):
        self.inputs = inputs

    def __enter__(self):
        import torch
        from transformers import AutoModelForCausalLM

        opts = self.inputs.options
        self.tok = load_tokenizer(self.inputs)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(self.inputs.base.path),
            dtype=getattr(torch, opts.hidden_dtype),
            device_map=resolve_device(opts.device),
            trust_remote_code=opts.trust_remote_code,
        )
        self.model.eval()
        return self

    def __exit__(self, *exc):
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, prompts: List[str], average: bool):
        import torch

        ids = tokenize(self.tok, prompts)
        total = torch.zeros(self.inputs.num_layers, self.inputs.hidden_size)
        step = self.inputs.options.prompt_batch_size
        device = self.model.get_input_embeddings().weight.device
        for start in range(0, len(ids), step):
            batch = ids[start:start + step]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(batch):  # right padding: real tokens never see the pads
                input_ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            with torch.no_grad():
                out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            layers = out.hidden_states[: self.inputs.num_layers]  # entering layer 0..L-1
            for l, h in enumerate(layers):
                h = h.float().cpu()
                if average:
                    m = mask.unsqueeze(-1).float()
                    total[l] += ((h * m).sum(1) / m.sum(1)).sum(0)
                else:
                    last = mask.sum(1) - 1
                    total[l] += h[torch.arange(len(batch)), last].sum(0)
        return total / len(ids)
