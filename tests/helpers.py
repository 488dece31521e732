"""Assertions shared by tests: read outputs with the reference readers, run models with transformers."""
import json
from pathlib import Path

import torch
from safetensors import safe_open


def read_tensors(model_dir) -> dict:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def logits(model_dir, texts=("Write a Python function that sorts", "Once upon a time there")):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # trust_remote_code: DeepSeek outputs load through the modeling code written beside their weights
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=True).eval()
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)
