"""moeforge demo: make small dense models, build an MoE from them, load it with transformers and generate.

Everything is created locally (no network): a base model trained briefly on mixed text, and four experts
fine-tuned from it on code, stories, arithmetic and German. Run: bash scripts/demo.sh [WORKDIR]
"""
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeforge
from moeforge.toy import make_dense

TASKS = {
    "code": ["def add(a, b): return a + b", "def mul(a, b): return a * b", "for i in range(10): print(i)"],
    "story": ["Once upon a time there was a dragon", "The knight rode into the dark forest", "She opened the old door"],
    "math": ["2 + 3 = 5", "7 * 6 = 42", "10 - 4 = 6", "9 / 3 = 3"],
    "german": ["Das ist ein Satz auf Deutsch", "Wie geht es dir heute", "Ich habe einen Hund"],
}


def main(work: Path) -> None:
    corpus = [t for texts in TASKS.values() for t in texts]
    print(f"making a base model and {len(TASKS)} experts in {work} ...")
    make_dense(work / "base", seed=0, hidden_size=64, intermediate_size=128, num_layers=2,
               tokenizer_corpus=corpus, train_texts=corpus, train_steps=30)
    for name, texts in TASKS.items():
        make_dense(work / name, init_from=work / "base", tokenizer_corpus=corpus, train_texts=texts, train_steps=40)

    config = {
        "base_model": str(work / "base"),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(work / name), "positive_prompts": texts[:2]} for name, texts in TASKS.items()
        ],
    }
    (work / "moe.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"building: moeforge build {work / 'moe.yml'} {work / 'moe'}")
    result = moeforge.build(work / "moe.yml", work / "moe", overwrite=True, random_seed=0, hidden_dtype="float32")
    print(result.summary())

    tok = AutoTokenizer.from_pretrained(str(work / "moe"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "moe"), dtype=torch.float32).eval()
    print(f"loaded {type(model).__name__} with {sum(p.numel() for p in model.parameters()):,} parameters")
    for prompt in ("def add(a,", "Once upon a", "7 * 6", "Wie geht"):
        ids = tok(tok.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        print(f"  {prompt!r} -> {tok.decode(gen[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="moeforge-demo-") as d:
            main(Path(d))
