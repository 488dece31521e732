"""WEMoE on the generated CLIP tasks of moeforge.wemoe.toy: per-task accuracy of the pretrained model, each
fine-tuned model, task arithmetic, WEMoE (1- and 2-layer routers) and E-WEMoE, with timings.

Everything is made locally (no downloads). Run:  .venv/bin/python benchmarks/wemoe_toy.py [--steps 100]
Prints markdown tables (the README's WEMoE table comes from this script).
"""
import argparse
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="benchmarks/work/wemoe", help="scratch directory (replaced)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import moeforge.wemoe as wemoe
    from moeforge.wemoe.toy import make_clip_tasks

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    variants = [
        ("WEMoE (2-layer router)", {}),
        ("WEMoE (1-layer router)", {"router_hidden_layers": 1}),
        ("E-WEMoE (90% sparse, shared router)", {"sparsity": 0.9}),
    ]
    for tasks in (("colors", "quadrant"), ("colors", "stripes", "quadrant")):
        t0 = time.perf_counter()
        base = make_clip_tasks(work / "-".join(tasks), tasks=tasks)
        made = time.perf_counter() - t0
        print(f"\n### tasks: {', '.join(tasks)} (models and data made in {made:.1f} s)\n")
        table = None
        for label, extra in variants:
            cfg = {**base, **extra, "tta": {"lr": args.lr, "max_steps": args.steps, "checkpoint_every": 0}}
            out = work / f"{'-'.join(tasks)}-{len(extra)}-{extra.get('router_hidden_layers', 2)}"
            t0 = time.perf_counter()
            result = wemoe.run(cfg, out, device=args.device, quiet=True)
            adapt_s = time.perf_counter() - t0
            methods = ("pretrained", "fine-tuned (own task)", "task arithmetic", "WEMoE") if table is None else ("WEMoE",)
            report = wemoe.evaluate(out, device=args.device, methods=methods)
            if table is None:
                table = {m: report.rows[m] for m in methods[:-1]}
            table[label] = report.rows["WEMoE"]
            p = result.params
            print(f"- {label}: {args.steps} steps in {adapt_s:.1f} s (build included); entropy "
                  f"{result.loss_first:.3f} -> {result.loss_last:.3f}; trainable {p['trainable']:,} of "
                  f"{p['total']:,} parameters ({p['trainable_percent']}%), task vectors {p['task_vectors']:,}")
        print()
        print("| method | " + " | ".join(tasks) + " | mean |")
        print("| --- |" + " ---: |" * (len(tasks) + 1))
        for method, accs in table.items():
            vals = [accs[t] for t in tasks]
            print(f"| {method} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")


if __name__ == "__main__":
    main()
