"""Source checks beyond shapes: the base holds every tensor its config implies, and experts share its vocabulary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from moeforge.errors import SourceError

log = logging.getLogger("moeforge")


def check_base_tensors(base, family, num_layers: int, hidden: int) -> None:
    """What passes through from the base must be whole: embeddings and lm_head that fit vocab_size and the
    hidden size, the final norm, the same tensors in every layer, and no layers beyond num_hidden_layers.

    Structural, from headers only: deriving the full expectation from transformers (as `moeforge verify`
    does) would import its modeling code, seconds that a copy-bound build should not pay.
    """
    from moeforge.families.base import layer_of

    config_file = base.path / "config.json"
    vocab = base.config_value("vocab_size")
    rows = vocab if isinstance(vocab, int) else None
    required = {"model.embed_tokens.weight": (rows, hidden), "model.norm.weight": (hidden,)}
    if base.config_value("tie_word_embeddings") is False or "lm_head.weight" in base.tensors:
        required["lm_head.weight"] = (rows, hidden)
    for name, want in required.items():
        ref = base.tensors.get(name)
        if ref is None:
            raise SourceError(f"{base.label}: missing tensor {name!r} (its config.json implies it)")
        if len(ref.shape) != len(want) or any(w is not None and g != w for g, w in zip(ref.shape, want)):
            shown = tuple("vocab_size" if w is None else w for w in want)
            raise SourceError(f"{ref.file}: tensor {name!r} has shape {tuple(ref.shape)}, but {config_file} implies {shown}")
    per_layer = {}
    for name, ref in base.tensors.items():
        layer = layer_of(name)
        if layer is None or family.is_mlp(name) or family.is_skipped(name):
            continue
        if layer >= num_layers:
            raise SourceError(f"{base.label}: has tensor {name!r}, but {config_file} says num_hidden_layers {num_layers}")
        per_layer.setdefault(name.replace(f".layers.{layer}.", ".layers.{}.", 1), {})[layer] = tuple(ref.shape)
    for template, shapes in sorted(per_layer.items()):
        for layer in range(num_layers):
            if layer not in shapes:
                other = next(iter(shapes))
                raise SourceError(f"{base.label}: missing tensor {template.format(layer)!r} (layer {other} has it)")
        if len(set(shapes.values())) > 1:
            raise SourceError(f"{base.label}: {template.format('N')!r} has different shapes in different layers: "
                              f"{sorted(set(shapes.values()))}")


def check_expert_vocab(base, experts) -> None:
    """Experts' MLPs were trained on their own token ids; the MoE uses the base's embeddings and tokenizer.

    A token with another id in an expert's tokenizer means its MLP learned from other embeddings: refused.
    Tokens an expert added (chat markers, say) are not in the MoE: a warning.
    """
    base_vocab = tokenizer_vocab(base.path)
    for expert, ckpt in experts:
        if ckpt.path == base.path:
            continue
        vocab = tokenizer_vocab(ckpt.path)
        if base_vocab is None or vocab is None:
            b, e = base.config_value("vocab_size"), ckpt.config_value("vocab_size")
            if b != e:
                log.warning("%s: vocab_size is %s, the base's is %s; the MoE uses the base's tokenizer and "
                            "embeddings", expert.label, e, b)
            continue
        if vocab is base_vocab:
            continue
        for token, base_id in base_vocab.items():
            got = vocab.get(token)
            if got is not None and got != base_id:
                raise SourceError(
                    f"{_tokenizer_file(ckpt.path)}: token {token!r} has id {got}, but {base_id} in the base's "
                    "tokenizer; experts must share the base's vocabulary (their MLPs were trained on its embeddings)"
                )
        extra = [t for t in vocab if t not in base_vocab]
        if extra:
            log.warning("%s: has %d token(s) the base's tokenizer lacks (e.g. %r); the MoE uses the base's tokenizer, "
                        "so they are not available", expert.label, len(extra), extra[0])


_CACHE: Dict[bytes, Dict[str, int]] = {}


def tokenizer_vocab(model_dir: Path) -> Optional[Dict[str, int]]:
    """token -> id from tokenizer.json (or vocab.json); None when the directory has neither."""
    path = _tokenizer_file(model_dir)
    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    import hashlib

    digest = hashlib.sha256(raw).digest()
    if digest in _CACHE:
        return _CACHE[digest]  # identical files give the identical object (compared by identity above)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: unreadable tokenizer file ({e})") from None
    vocab: Dict[str, int] = {}
    model = data.get("model") if isinstance(data, dict) else None
    model = model if isinstance(model, dict) else {}
    table = model.get("vocab") if path.name == "tokenizer.json" else data
    if isinstance(table, dict):
        vocab.update({str(k): int(v) for k, v in table.items() if isinstance(v, int)})
    elif isinstance(table, list):  # Unigram: [[piece, score], ...] in id order
        vocab.update({str(entry[0]): i for i, entry in enumerate(table) if entry})
    for added in (data.get("added_tokens") or []) if isinstance(data, dict) and path.name == "tokenizer.json" else []:
        if isinstance(added, dict) and "content" in added and "id" in added:
            vocab[str(added["content"])] = int(added["id"])
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[digest] = vocab
    return vocab


def _tokenizer_file(model_dir: Path) -> Optional[Path]:
    for name in ("tokenizer.json", "vocab.json"):
        if (model_dir / name).is_file():
            return model_dir / name
    return None
