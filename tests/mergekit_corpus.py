"""The mergekit-moe compatibility corpus: real-world config shapes (tests/data/mergekit_configs/*.yml) whose model
names are replaced by tiny local stand-ins, and mergekit-moe 0.1.5's option list. Shared by
tests/test_mergekit_corpus.py and benchmarks/compare_mergekit.py (which builds each config with mergekit-moe too).

A config's header comments may say what a build of it must log, `# expect-warning: TEXT` (moeforge logs a
warning containing TEXT once), and why the benchmark finds mergekit-moe's output different: `# parity: TEXT`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "mergekit_configs"
OPTIONS_FILE = DATA / "mergekit_moe_options.txt"

# Hub name -> (family, seed). Every model of a family shares one tokenizer, so experts match their base.
STANDINS: Dict[str, Tuple[str, int]] = {
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", 0),
    "mistralai/Mistral-7B-v0.1": ("mistral", 1),
    "teknium/OpenHermes-2.5-Mistral-7B": ("mistral", 2),
    "meta-math/MetaMath-Mistral-7B": ("mistral", 3),
    "BioMistral/BioMistral-7B": ("mistral", 4),
    "HuggingFaceH4/zephyr-7b-beta": ("mistral", 5),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 10),
    "NousResearch/Hermes-2-Pro-Llama-3-8B": ("llama", 11),
    "cognitivecomputations/dolphin-2.9-llama3-8b": ("llama", 12),
    "aaditya/Llama3-OpenBioLLM-8B": ("llama", 13),
    "BEE-spoke-data/smol_llama-220M-GQA": ("llama", 14),
    "Qwen/Qwen2-1.5B-Instruct": ("qwen2", 20),
    "Qwen/Qwen2-Math-1.5B-Instruct": ("qwen2", 21),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": ("qwen2", 22),
    "Qwen/Qwen3-0.6B": ("qwen3", 30),
    "Qwen/Qwen3-0.6B-Base": ("qwen3", 31),
}
# Hub name of a LoRA adapter -> the stand-in it adapts (as `model+adapter` in a config).
LORAS: Dict[str, str] = {"predibase/magicoder-lora": "mistralai/Mistral-7B-v0.1"}


def make_standins(root: Path, names=None) -> Dict[str, str]:
    """Tiny bfloat16 models (and adapters) for `names` (default: all), made under `root` once; name -> path."""
    root = Path(root)
    wanted = list(names) if names is not None else list(STANDINS) + list(LORAS)
    paths = {}
    for name in wanted:
        path = root / name.replace("/", "--")
        if name in LORAS:
            _make_lora(path, Path(make_standins(root, [LORAS[name]])[LORAS[name]]))
        else:
            _make_model(path, *STANDINS[name])
        paths[name] = str(path)
    return paths


def _make_model(path: Path, family: str, seed: int) -> None:
    if (path / "config.json").exists():
        return
    from moeforge.toy import make_dense

    extra = {"sliding_window": None} if family == "mistral" else {}
    make_dense(path, family=family, seed=seed, dtype="bfloat16", bos=family not in ("qwen2", "qwen3"), **extra)
    if family == "qwen2":  # as some Qwen2 tokenizers: a pad token without an embedding row
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        tok.add_special_tokens({"pad_token": "<|pad_beyond|>"})
        tok.save_pretrained(str(path))


def _make_lora(path: Path, base: Path) -> None:
    if (path / "adapter_config.json").exists():
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(path))


def corpus() -> List[Path]:
    return sorted(CORPUS.glob("*.yml"))


def names_in(text: str) -> List[str]:
    return [n for n in list(STANDINS) + list(LORAS) if n in text]


def substitute(text: str, paths: Dict[str, str]) -> str:
    """The config text with every model name replaced by its stand-in's path (anchors, comments kept)."""
    for name in sorted(paths, key=len, reverse=True):
        text = text.replace(name, paths[name])
    return text


def expected_warnings(text: str) -> List[str]:
    return re.findall(r"^#\s*expect-warning:\s*(.+?)\s*$", text, flags=re.MULTILINE)


def parse_help_options(help_text: str) -> List[str]:
    """The option declarations of a click --help, as written there: `-j, --num-threads INTEGER`."""
    found = []
    for line in help_text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            found.append(m.group(1).strip())
    return found


def checked_in_options() -> List[str]:
    return [l for l in OPTIONS_FILE.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]


def spellings(declaration: str) -> List[Tuple[str, bool]]:
    """Every way to write one declared option, and whether it takes a value: `--cuda / --no-cuda` gives both."""
    parts = declaration.split()
    takes_value = not parts[-1].startswith("-")
    names = [p.rstrip(",") for p in parts if p.startswith("-")]
    return [(n, takes_value) for n in names]
