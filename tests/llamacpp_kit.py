"""llama.cpp as users get it: the `llama-cpp-python` source distribution from PyPI carries llama.cpp, its
`convert_hf_to_gguf.py` and `gguf-py`. Shared by tests/test_llamacpp_convert.py and benchmarks/runtimes.py.

The converter only accepts a BPE tokenizer whose pre-tokenizer hash it knows, so the tiny models here carry
GPT-2's tokenizer, rebuilt with `tokenizers` from the vocabulary file the sdist ships for llama.cpp's own
tokenizer tests (models/ggml-vocab-gpt-2.gguf); their embeddings have GPT-2's 50257 rows.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, Tuple

SDIST_VERSION = "0.3.36"  # llama.cpp 0c1e570
REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("MOEFORGE_LLAMACPP_DIR", REPO / "benchmarks" / "work"))  # gitignored cache
HIDDEN, INTERMEDIATE = 32, 64


class Unavailable(RuntimeError):
    """The sdist is not cached (or, when downloading, PyPI cannot be reached)."""


def source(download: bool = False) -> Path:
    """llama.cpp's source tree from the sdist, cached under WORK; `download`: fetch it with pip if missing
    (scripts/setup.sh and the benchmark do; tests only read the cache)."""
    root = WORK / f"llama_cpp_python-{SDIST_VERSION}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    WORK.mkdir(parents=True, exist_ok=True)
    archive = WORK / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not archive.is_file() and not download:
        raise Unavailable(f"llama-cpp-python=={SDIST_VERSION} sdist not in {WORK}: run scripts/setup.sh")
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
               f"llama-cpp-python=={SDIST_VERSION}", "-d", str(WORK)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise Unavailable(f"cannot download llama-cpp-python=={SDIST_VERSION}: {done.stderr.strip()[-300:]}")
    with tarfile.open(archive) as tar:
        tar.extractall(WORK, filter="data")
    return tree


def gguf_module():
    tree = str(source() / "gguf-py")
    if tree not in sys.path:
        sys.path.insert(0, tree)
    import gguf

    return gguf


def write_gpt2_tokenizer(out_dir: Path) -> None:
    """GPT-2's byte-level BPE tokenizer (the converter recognises it as pre-tokenizer `gpt-2`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf_module().GGUFReader(str(source() / "models" / "ggml-vocab-gpt-2.gguf"))

    def strings(key):
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = tokens[-1]  # <|endoftext|>
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos).save_pretrained(str(out_dir))


def make_dense(out_dir: Path, family: str = "llama", seed: int = 0, init_from: Path = None, mlp_noise: float = 0.0):
    """A tiny dense model with the GPT-2 tokenizer: random (seeded), or `init_from`'s weights with Gaussian
    noise added to every MLP matrix (a different expert on the same attention)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    if init_from is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(init_from), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.add_(torch.randn_like(p) * mlp_noise)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}[family]
        extra = {"head_dim": HIDDEN // 4} if family == "qwen3" else {}
        config = cls(vocab_size=50257, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # larger than the default init, so that experts and routers matter
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                    p.normal_(0.0, 0.15)
    model.save_pretrained(str(out_dir))
    write_gpt2_tokenizer(out_dir)
    return out_dir


def convert(model_dir: Path, out_file: Path) -> subprocess.CompletedProcess:
    """Run the real convert_hf_to_gguf.py to an f32 GGUF; the completed process (check returncode)."""
    cmd = [sys.executable, str(source() / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
           "--outfile", str(out_file)]
    return subprocess.run(cmd, capture_output=True, text=True)


def read_gguf(path: Path) -> Tuple[Dict[str, object], Dict[str, Tuple[int, ...]]]:
    """(metadata scalars and strings, {tensor name: shape in PyTorch order}) read with gguf-py."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY:
            meta[key] = field.contents()
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return meta, tensors
