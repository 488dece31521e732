"""Dense Llama checkpoints for the benchmarks: random bf16 weights written straight to safetensors (no training).

Sizes match the numbers measured for mergekit-moe in the issue: `large` is 853M parameters (hidden 2048,
16 layers), `small` 179M (hidden 1024, 8 layers). Each model's tensors are random windows of one shared
random pool, so generating 4 x 1.7 GB takes seconds and every model's tensors differ.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SIZES = {
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8),
    "small": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8),
}
VOCAB = 32000
NUM_MODELS = 4


def model_config(size: str):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, dtype="bfloat16", **SIZES[size],
    )


def tensor_shapes(config) -> dict:
    """name -> shape of the model's state dict, from a model built on the meta device (no memory)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def make_models(size: str, out: Path, count: int = NUM_MODELS, seed: int = 0) -> list:
    """Write `count` dense checkpoints under out/{size}-{i}; existing complete ones are kept."""
    import torch
    from safetensors.torch import save_file

    from moeforge.toy import make_tokenizer

    config = model_config(size)
    shapes = tensor_shapes(config)
    largest = max(n for n in (_numel(s) for s in shapes.values()))
    gen = torch.Generator().manual_seed(seed)
    pool = None
    paths = []
    for i in range(count):
        path = out / f"{size}-{i}"
        paths.append(path)
        if (path / "model.safetensors").exists() and (path / "config.json").exists():
            continue
        if pool is None:
            pool = (torch.randn(2 * largest, generator=gen) * 0.02).to(torch.bfloat16)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, shape in shapes.items():
            n = _numel(shape)
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
            tensors[name] = pool[start:start + n].view(shape).clone()
        save_file(tensors, str(path / "model.safetensors.partial"), metadata={"format": "pt"})
        (path / "model.safetensors.partial").rename(path / "model.safetensors")
        config.save_pretrained(str(path))
        make_tokenizer(path)
    return paths


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("size", choices=sorted(SIZES))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "models")
    p.add_argument("--count", type=int, default=NUM_MODELS)
    args = p.parse_args()
    for path in make_models(args.size, args.out, args.count):
        print(path)


if __name__ == "__main__":
    main()
