"""On a CUDA machine: hidden-state routers computed on the GPU (--device cuda / auto) match the CPU ones,
and the built MoE runs on the GPU with the base's logits when its experts are copies of the base.

    python benchmarks/gpu_check.py [--work DIR] [--json FILE]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import moeforge
from moeforge.toy import make_dense


def routers(out: Path, layers: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return torch.stack([f.get_tensor(f"model.layers.{l}.block_sparse_moe.gate.weight") for l in range(layers)])


def main(work: Path) -> dict:
    results = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    make_dense(work / "base", seed=0, hidden_size=256, intermediate_size=512, num_layers=4)
    make_dense(work / "code", init_from=work / "base", train_texts=["def add(a, b): return a + b"], train_steps=3)
    cfg = {"base_model": str(work / "base"), "gate_mode": "hidden", "dtype": "float32", "experts": [
        {"source_model": str(work / "base"), "positive_prompts": ["Write a Python function that"]},
        {"source_model": str(work / "code"), "positive_prompts": ["Once upon a time"]}]}
    built = {}
    for device in ("cpu", "cuda", "auto"):
        t = time.perf_counter()
        moeforge.build(cfg, work / device, quiet=True, random_seed=0, device=device, hidden_dtype="float32")
        built[device] = routers(work / device, 4)
        results[f"build_s_{device}"] = round(time.perf_counter() - t, 2)
    for device in ("cuda", "auto"):
        results[f"max_router_diff_{device}_vs_cpu"] = float((built[device] - built["cpu"]).abs().max())
    for bits in (4, 8):  # bitsandbytes on the GPU: routers close to the float32 ones
        try:
            moeforge.build(cfg, work / f"q{bits}", quiet=True, random_seed=0, device="cuda", hidden_dtype="float16",
                           **{f"load_in_{bits}bit": True})
        except Exception as e:  # report, don't stop the other checks
            results[f"{bits}bit"] = f"failed: {type(e).__name__}: {e}"
            continue
        q = routers(work / f"q{bits}", 4)
        results[f"min_router_cosine_{bits}bit_vs_cpu"] = float(torch.nn.functional.cosine_similarity(
            q[1:].flatten(0, 1), built["cpu"][1:].flatten(0, 1), dim=-1).min())
    cfg_fitted = dict(cfg, gate_mode="fitted")
    t = time.perf_counter()
    moeforge.build(cfg_fitted, work / "fitted", quiet=True, random_seed=0, device="cuda", hidden_dtype="float32")
    results["build_s_fitted_cuda"] = round(time.perf_counter() - t, 2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    same = dict(cfg, experts=[dict(e, source_model=str(work / "base")) for e in cfg["experts"]])
    moeforge.build(same, work / "copies", quiet=True, random_seed=0, device="cuda", allow_all_same=True)
    tok = AutoTokenizer.from_pretrained(str(work / "base"))
    ids = tok(["Write a Python function that sorts"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        moe = AutoModelForCausalLM.from_pretrained(str(work / "copies"), dtype=torch.float32).cuda()(**ids).logits
        dense = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32).cuda()(**ids).logits
    results["moe_vs_dense_logits_max_diff_cuda"] = float((moe - dense).abs().max())
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = main(Path(args.work or d))
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
