"""WEMoE cost at CLIP-ViT-B/32 size: seconds per test-time-adaptation step, peak accelerator memory and
sample-wise inference throughput, with 8 tasks as in the paper (FusionBench defaults: 2-layer routers,
batch 16 per task, gradient accumulation).

No weights are downloaded: the base is a randomly initialised CLIPModel of ViT-B/32 shape (text tower of the
same width), the 8 "fine-tuned" experts are the base's vision tower plus small Gaussian task vectors, and the
inputs are generated images. Accuracy is meaningless here; only time and memory are measured.

    python benchmarks/wemoe_scale.py --device cuda            # one GPU
    python benchmarks/wemoe_scale.py --small --device cpu     # a quick check of the script itself
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def make_inputs(work: Path, tasks: int, small: bool, images: int) -> dict:
    from PIL import Image
    from transformers import CLIPModel, CLIPVisionModel

    from moeforge.wemoe.toy import make_clip

    dims = (dict(hidden_size=64, intermediate_size=256, num_layers=2, image_size=32, patch_size=8, num_heads=4)
            if small else dict(hidden_size=768, intermediate_size=3072, num_layers=12, image_size=224,
                               patch_size=32, num_heads=12))
    make_clip(work / "base", seed=0, **dims)
    base = CLIPModel.from_pretrained(str(work / "base"))
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    experts = []
    for t in range(tasks):
        vision = CLIPVisionModel(base.config.vision_config)
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.vision_model.state_dict().items()}
        vision.load_state_dict(state)
        vision.save_pretrained(str(work / f"expert{t}"))
        classes = [f"class {t}-{c}" for c in range(10)]
        for i in range(images):
            sub = work / "data" / f"task{t}" / classes[i % 10]
            sub.mkdir(parents=True, exist_ok=True)
            size = dims["image_size"]
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        experts.append({"name": f"task{t}", "source_model": str(work / f"expert{t}"),
                        "data": str(work / "data" / f"task{t}"), "classes": classes})
    return {"family": "clip-vision", "base_model": str(work / "base"), "experts": experts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="benchmarks/work/wemoe-scale")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=64, help="images per task")
    ap.add_argument("--workers", type=int, default=4, help="data-loading processes per task")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    import moeforge.wemoe as wemoe
    from moeforge.wemoe.data import load_task_data, sequential_batches

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = make_inputs(work, args.tasks, args.small, args.images)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "setup_seconds": round(time.perf_counter() - t0, 1)}
    for label, extra in (("WEMoE 2-layer", {}), ("E-WEMoE 90%", {"sparsity": 0.9})):
        run_cfg = {**cfg, **extra, "tta": {"max_steps": args.steps, "checkpoint_every": 0,
                                           "num_workers": args.workers}}
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = wemoe.run(run_cfg, work / f"out-{len(extra)}", device=args.device, quiet=True)
        total = time.perf_counter() - t0
        meta = json.loads((work / f"out-{len(extra)}" / "wemoe.json").read_text())
        row = {"run_seconds": round(total, 1), "seconds_per_step": meta["tta"]["seconds_per_step_median"],
               "params": meta["params"]}
        if args.device == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # sample-wise routed inference, as after loading
        model = result.model
        model.batch_reduce = False
        task = model.config.experts[0]
        data = load_task_data(task, "images", task.name)
        batches = [{k: v.to(model.hf.device) for k, v in b.items()}
                   for b in sequential_batches(data, model.runtime.collate, 64)]
        with torch.no_grad():
            model.task_logits(task.name, batches[0])
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 0
            for b in batches:
                model.task_logits(task.name, b)
                n += len(b["pixel_values"])
            if args.device == "cuda":
                torch.cuda.synchronize()
        row["inference_images_per_second"] = round(n / (time.perf_counter() - t0), 1)
        results[label] = row
        del model, result
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(label, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
