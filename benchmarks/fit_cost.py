"""Cost of gate_mode fitted: 8 experts x 100 prompts through a dense base, on CPU.

Times the one batched forward pass that captures the router inputs and the per-layer fits separately.

    .venv/bin/python benchmarks/fit_cost.py [--hidden 1024 --layers 8 --experts 8 --prompts 100]
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from routing_quality import TASKS  # noqa: E402

from moeforge.config import Expert  # noqa: E402
from moeforge.gates import GateInputs  # noqa: E402
from moeforge.gates.base_model import BaseModel  # noqa: E402
from moeforge.gates.fitted import prompt_table, routed_labels  # noqa: E402
from moeforge.gates.fitting import fit_gate  # noqa: E402
from moeforge.options import BuildOptions  # noqa: E402
from moeforge.sources.open_model import open_checkpoint  # noqa: E402
from moeforge.toy import make_dense  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "fit_cost")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--dtype", default="bfloat16", help="dtype of the forward pass (--hidden-dtype)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| hidden | layers | experts x prompts | tokens | dtype | forward pass | step 2 (experts' MLPs) | fits | "
          "captured | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|")

    r = random.Random(0)
    generators = list(TASKS.values())
    prompts = [[f"{e}: " + generators[e % len(generators)](r) for _ in range(args.prompts)] for e in range(args.experts)]
    base_dir = args.work / f"base-h{args.hidden}-l{args.layers}"
    if not (base_dir / "config.json").exists():
        make_dense(base_dir, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                   tokenizer_corpus=[x for ps in prompts for x in ps], vocab_size=1024, dtype="bfloat16")
    experts = [Expert(source_model=f"e{e}", positive_prompts=ps) for e, ps in enumerate(prompts)]
    base = open_checkpoint(str(base_dir))
    inputs = GateInputs(base, experts, args.layers, args.hidden, 0, BuildOptions(hidden_dtype=args.dtype, device="cpu",
                                                                                   quiet=True))
    unique, positives, negatives = prompt_table(experts)
    with BaseModel(inputs) as model:
        t1 = time.perf_counter()
        captured = model.router_inputs(unique)
        t_forward = time.perf_counter() - t1
        t3 = time.perf_counter()  # step 2: each expert's prompts with its MLPs (here the base's own, re-read)
        params = model.mlp_parameters()
        for e, expert in enumerate(experts):
            with model.expert_mlps(base, expert, params):
                model.router_inputs([unique[i] for i in positives[e]])
        t_forced = time.perf_counter() - t3
    rows, pos, neg = routed_labels(captured.prompt_of_token, positives, negatives)
    fit_times, iterations = [], []
    for layer in range(args.layers):
        t2 = time.perf_counter()
        result = fit_gate(captured.layers[layer].float()[rows], pos, neg, rows=args.experts)
        fit_times.append(time.perf_counter() - t2)
        iterations.append(result.iterations)
    tokens = captured.layers[0].shape[0]
    stored = sum(x.numel() * x.element_size() for x in captured.layers)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {args.hidden} | {args.layers} | {args.experts} x {args.prompts} | {tokens} | {args.dtype} | "
          f"{t_forward:.1f} s | {t_forced:.1f} s | {sum(fit_times):.1f} s ({sum(fit_times) / args.layers:.2f} s/layer, "
          f"{min(iterations)}-{max(iterations)} L-BFGS iterations) | {stored / 2**20:.0f} MiB | {peak:.0f} MiB |")
    base.close()


if __name__ == "__main__":
    main()
