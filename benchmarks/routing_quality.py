"""Routing quality of each gate mode, on CPU in a few minutes.

Makes a small base model trained on four tasks that share one (byte-level) vocabulary, fine-tunes one
expert per task from it, and builds a top-1 MoE from them with every gate mode. On held-out text of each
task it reports the loss of: the base, the task's own expert, perfect top-1 routing (the base with that
expert's MLPs, i.e. the MoE routing every token of the task to its expert), and each MoE; plus top-1
routing agreement (share of token x layer decisions that pick the task's expert; chance is 25%).

    .venv/bin/python benchmarks/routing_quality.py [--work benchmarks/work/routing] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

import moeforge
from moeforge.toy import TASKS, make_dense, texts

MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "fitted")
BATCH = 32

def make_models(work: Path, seed: int, layers: int, steps_base: int, steps_expert: int, train_count: int,
                lr_expert: float, bos: bool, vocab: int, tune: str):
    """A base briefly trained on all four tasks, then one fully fine-tuned expert per task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeforge.toy import train as train_steps

    train = {t: texts(t, train_count, seed) for t in TASKS}
    corpus = [x for t in TASKS for x in train[t]]
    mixed = random.Random(seed).sample(corpus, len(corpus))  # minibatches of every task
    make_dense(work / "base", seed=seed, hidden_size=64, intermediate_size=256, num_layers=layers,
               tokenizer_corpus=corpus, train_texts=mixed, train_steps=steps_base, train_batch_size=BATCH, bos=bos,
               vocab_size=vocab)
    tok = AutoTokenizer.from_pretrained(str(work / "base"))
    for t in TASKS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
        for name, param in model.named_parameters():
            param.requires_grad = tune == "full" or ".mlp." in name
        train_steps(model, tok, train[t], steps_expert, lr=lr_expert, batch_size=BATCH)
        model.save_pretrained(str(work / t))
        tok.save_pretrained(str(work / t))
    return train


def perfect_routing_model(work: Path, task: str):
    """The base with the task expert's MLP in every layer: what a perfect top-1 router gives on that task."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
    mlp = {k: v for k, v in load_file(str(work / task / "model.safetensors")).items() if ".mlp." in k}
    missing = set(mlp) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(mlp, strict=False)
    return model.eval()


def evaluate(model, tok, samples, expert: int = -1):
    """Mean next-token loss over the samples' real tokens and, for an MoE, the share of top-1 routing decisions
    (tokens x layers, bos excluded) that pick `expert`."""
    from moeforge.inspect import RouterRecorder, moe_shape

    batch = tok([(tok.bos_token or "") + s for s in samples], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    is_moe = expert >= 0
    recorder = None
    if is_moe:
        n_experts, _ = moe_shape(model.config)
        recorder = RouterRecorder(model, n_experts, model.config.hidden_size)
    with torch.no_grad():
        if recorder is None:
            loss = model(**batch, labels=labels).loss
            return float(loss), None
        with recorder:
            loss = model(**batch, labels=labels).loss
        keep = batch["attention_mask"].bool()
        keep[:, 0] = tok.bos_token is None
        keep = keep.reshape(-1)
        hits = [float((torch.cat(recorder.logits[l])[keep].argmax(-1) == expert).float().mean()) for l in recorder.layers]
        return float(loss), sum(hits) / len(hits)


def build_moe(work: Path, mode: str, prompts, seed: int, top_k: int) -> Path:
    out = work / f"moe-{mode}"
    config = {
        "base_model": str(work / "base"),
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": top_k,
        "experts": [{"source_model": str(work / t), "positive_prompts": prompts[t]} for t in TASKS],
    }
    (work / f"moe-{mode}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    moeforge.build(config, out, overwrite=True, random_seed=seed, hidden_dtype="float32", quiet=True)
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "routing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=20, help="positive prompts per expert")
    p.add_argument("--top-k", type=int, default=2, help="experts_per_token of the MoEs (mergekit default: 2)")
    p.add_argument("--steps-base", type=int, default=100)
    p.add_argument("--steps-expert", type=int, default=150)
    p.add_argument("--lr-expert", type=float, default=None, help="default: 2e-3 for --tune mlp, 1e-3 for full")
    p.add_argument("--train", type=int, default=1000, help="training texts per task")
    p.add_argument("--eval", type=int, default=100, help="held-out texts per task")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False,
                   help="prepend a bos token to every text (Llama-style); default: none (Qwen-style)")
    p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size shared by all tasks")
    p.add_argument("--tune", choices=["full", "mlp"], default="mlp",
                   help="what the experts' fine-tuning changes: every weight, or only the MLPs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    args = p.parse_args(argv)
    if args.lr_expert is None:
        args.lr_expert = 2e-3 if args.tune == "mlp" else 1e-3
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = args.work / f"seed{args.seed}-v{args.vocab}-{args.tune}{'-bos' if args.bos else ''}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = make_models(work, args.seed, args.layers, args.steps_base, args.steps_expert, args.train, args.lr_expert,
                        args.bos, args.vocab, args.tune)
    t_models = time.perf_counter() - t0
    held_out = {t: texts(t, args.eval, args.seed + 1000) for t in TASKS}
    prompts = {t: train[t][: args.prompts] for t in TASKS}
    tok = AutoTokenizer.from_pretrained(str(work / "base"))
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731

    rows = {"base": {}, "own expert": {}, "perfect top-1 routing": {}}
    base = load(work / "base")
    for t in TASKS:
        rows["base"][t] = evaluate(base, tok, held_out[t])[0]
        rows["own expert"][t] = evaluate(load(work / t), tok, held_out[t])[0]
        rows["perfect top-1 routing"][t] = evaluate(perfect_routing_model(work, t), tok, held_out[t])[0]
    agreement, build_seconds = {}, {}
    for mode in MODES:
        out, build_seconds[mode] = build_moe(work, mode, prompts, args.seed, args.top_k)
        moe = load(out)
        rows[mode], agreement[mode] = {}, {}
        for e, t in enumerate(TASKS):
            rows[mode][t], agreement[mode][t] = evaluate(moe, tok, held_out[t], expert=e)

    def mean(d):
        return sum(d.values()) / len(d)

    base_mean, perfect_mean = mean(rows["base"]), mean(rows["perfect top-1 routing"])
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "losses": rows, "agreement": agreement,
              "build_seconds": build_seconds, "model_seconds": t_models,
              "gap_closed": {m: (base_mean - mean(rows[m])) / (base_mean - perfect_mean) for m in MODES}}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(markdown(result, args))
    return result


def markdown(result: dict, args) -> str:
    rows, agreement, gap = result["losses"], result["agreement"], result["gap_closed"]
    head = "| | " + " | ".join(TASKS) + " | mean loss | gap closed | top-1 agreement |"
    lines = [head, "|---" * (len(TASKS) + 4) + "|"]
    for name, losses in rows.items():
        mean_loss = sum(losses.values()) / len(losses)
        gap_cell = f"{100 * gap[name]:.0f}%" if name in gap else ""
        agree_cell = f"{100 * sum(agreement[name].values()) / len(TASKS):.0f}%" if name in agreement else ""
        label = f"`{name}`" if name in MODES else name
        lines.append(f"| {label} | " + " | ".join(f"{losses[t]:.3f}" for t in TASKS)
                     + f" | {mean_loss:.3f} | {gap_cell} | {agree_cell} |")
    lines.append("")
    lines.append(f"seed {args.seed}, {args.layers} layers, experts tuned: {args.tune}, {'bos' if args.bos else 'no bos'}, "
                 f"vocab {args.vocab}, top-{args.top_k}, {args.prompts} prompts per expert; "
                 f"build seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in result["build_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
