"""moeforge demo: four small experts, one MoE with fitted routers, and what those routers choose.

Everything is made locally (no network): a small base model trained on four synthetic tasks (Python-like code,
arithmetic, English stories, German sentences), one expert per task fine-tuned from it, then
`moeforge build` with `gate_mode: fitted`. The MoE is loaded with transformers; for each prompt the demo
prints its continuation and the expert its routers chose, then `moeforge inspect`'s table for held-out texts.

    bash scripts/demo.sh [WORKDIR]        # or: python examples/demo.py [WORKDIR]
"""
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers: no loading bar for each small model

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeforge
from moeforge.inspect import inspect_model
from moeforge.inspect.prompts_file import Prompt
from moeforge.toy import TASKS, make_dense, texts, train

PROMPTS = {"code": "def scale(x): return", "math": "Solve: 12 + 7 =", "story": "Once upon a time a brave",
           "german": "Heute sieht die kleine"}
TRAIN, PROMPTS_PER_EXPERT, HELD_OUT = 1000, 20, 10
EOS = "</s>"  # moeforge.toy's tokenizers


def make_experts(work: Path) -> dict:
    """A base trained on every task, then one expert per task whose MLPs are fine-tuned on that task."""
    data = {task: texts(task, TRAIN, seed=0) for task in TASKS}
    corpus = [t for task in TASKS for t in data[task]]
    ended = {task: [t + EOS for t in data[task]] for task in TASKS}  # so that generation stops after one text
    mixed = random.Random(0).sample([t for task in TASKS for t in ended[task]], len(corpus))
    make_dense(work / "base", seed=0, hidden_size=64, intermediate_size=256, num_layers=4, vocab_size=512,
               bos=False, tokenizer_corpus=corpus, train_texts=mixed, train_steps=100, train_batch_size=32)
    tok = AutoTokenizer.from_pretrained(str(work / "base"))
    assert tok.eos_token == EOS
    for task in TASKS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
        for name, param in model.named_parameters():
            param.requires_grad = ".mlp." in name
        train(model, tok, ended[task], steps=150, lr=2e-3, batch_size=32)
        model.save_pretrained(str(work / task))
        tok.save_pretrained(str(work / task))
    return data


def continuation(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(work: Path) -> None:
    started = time.monotonic()
    print(f"training a base model and {len(TASKS)} experts ({', '.join(TASKS)}) in {work} ...")
    data = make_experts(work)
    config = {
        "base_model": str(work / "base"),
        "gate_mode": "fitted",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(work / task), "positive_prompts": data[task][:PROMPTS_PER_EXPERT]}
                    for task in TASKS],
    }
    (work / "moe.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"\n$ moeforge build {work / 'moe.yml'} {work / 'moe'}")
    result = moeforge.build(work / "moe.yml", work / "moe", overwrite=True, random_seed=0, hidden_dtype="float32",
                            quiet=True)
    print(result.summary())

    moe = work / "moe"
    tok = AutoTokenizer.from_pretrained(str(moe))
    model = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).eval()
    print(f"\nloaded {type(model).__name__} with transformers; greedy continuations and the expert the routers "
          "chose first (share of the prompt's tokens x layers):")
    for task, prompt in PROMPTS.items():
        report = inspect_model(moe, [Prompt(prompt)], device="cpu", quiet=True)
        shares = report.share(report.top1).mean(0)
        chosen = int(shares.argmax())
        print(f"  [{report.expert_names[chosen]:>6} {100 * float(shares[chosen]):3.0f}%]  {prompt!r} -> "
              f"{continuation(model, tok, prompt)!r}")

    held_out = [Prompt(t, task) for task in TASKS for t in texts(task, HELD_OUT, seed=1)]
    print(f"\n$ moeforge inspect {moe} --prompts held-out.jsonl   # {HELD_OUT} unseen texts per task, labelled")
    print(inspect_model(moe, held_out, device="cpu", quiet=True).table())
    print(f"\n'label first' is the share of tokens whose first choice is their own task's expert (chance: 25%). "
          f"Done in {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="moeforge-demo-") as d:
            main(Path(d))
