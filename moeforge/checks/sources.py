"""Source checks beyond shapes: the base holds every tensor its config implies, and experts share its vocabulary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from moeforge.errors import SourceError

log = logging.getLogger("moeforge")


def check_base_tensors(base, family) -> None:
    """Missing tensors and shapes that contradict config.json (e.g. embedding rows vs vocab_size)."""
    if "text_config" in base.config:
        return  # a multimodal wrapper: the dense model is nested; the MLP checks still apply
    from moeforge.checks.expected import dense_shapes

    expected = dense_shapes(base.config, base.config["model_type"])
    if expected is None:
        return
    config_file = base.path / "config.json"
    for name, shape in expected.items():
        if family.is_mlp(name):
            continue  # checked layer by layer with the experts
        ref = base.tensors.get(name)
        if ref is None:
            raise SourceError(f"{base.label}: missing tensor {name!r} (its config.json implies it)")
        if tuple(ref.shape) != shape:
            raise SourceError(
                f"{ref.file}: tensor {name!r} has shape {tuple(ref.shape)}, but {config_file} implies {shape}"
            )


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
                            "embeddings", expert.source_model, e, b)
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
                        "so they are not available", expert.source_model, len(extra), extra[0])


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
