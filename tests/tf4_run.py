"""Run in the transformers 4.57 venv (tests/tf4_venv.py) by tests/test_transformers4.py: builds checkpoints with
this work tree's moeforge, then loads checkpoints with transformers 4.57 and saves their logits and what their
config reads as.

    python tests/tf4_run.py JOB.json RESULT.pt

JOB.json: {"texts": [...], "build": [[config, out_dir], ...], "load": [model_dir, ...]}. RESULT.pt: {"version":
..., "logits": {model_dir: tensor}, "config": {model_dir: {attribute: value}}, "errors": {path: message}}: one
checkpoint that fails to build or load does not hide the others.
"""
import json
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# what the 4.57 classes read these keys as, for the assertions' messages
ATTRIBUTES = ("rope_theta", "rope_scaling", "num_experts", "num_local_experts", "n_routed_experts", "head_dim")


def logits(model_dir, texts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"].unsqueeze(-1)


def main(job_path, result_path):
    job = json.loads(open(job_path).read())
    result = {"version": transformers.__version__, "logits": {}, "config": {}, "errors": {}}
    for config, out_dir in job.get("build", []):
        import moeforge

        try:
            moeforge.build(config, out_dir, quiet=True, allow_all_same=True, random_seed=0)
        except Exception as e:  # reported by the test that reads this output
            result["errors"][out_dir] = f"build: {type(e).__name__}: {e}"
    for model_dir in job.get("load", []):
        try:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
            result["config"][model_dir] = {a: getattr(config, a) for a in ATTRIBUTES if hasattr(config, a)}
            result["logits"][model_dir] = logits(model_dir, job["texts"])
        except Exception as e:
            result["errors"][model_dir] = f"load: {type(e).__name__}: {str(e)[:2000]}"
    torch.save(result, result_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
