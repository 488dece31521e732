"""Does llama.cpp compute what transformers computes, for every layout, shared-expert count and `renormalize`?

Builds llama.cpp (CPU, from the llama-cpp-python sdist on PyPI; cached under benchmarks/work/), converts each
moeforge output with llama.cpp's convert_hf_to_gguf.py to an f32 GGUF, runs it with an f32 KV cache
(benchmarks/llama_logits.c) and prints, per case, the max abs difference of llama.cpp's logits from
transformers', next to what the layout's runtime facts declare. Identical experts also show transformers
against the dense base. Results: docs/runtimes.md.

    PYTHONPATH=. python benchmarks/runtimes.py [--jobs 2] [--only qwen,deepseek]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import llamacpp_kit as kit  # noqa: E402

TOLERANCE = 1e-4
TEXT = "Once upon a time there was a dragon who lived by the sea"
# layout, base family, shared experts, renormalize values, routed experts
CASES = [
    ("mixtral", "llama", 0, (None,), 4),
    ("mixtral", "llama", 0, (None,), 3),
    ("qwen", "llama", 1, (True, False), 4),
    ("qwen", "llama", 2, (True, False), 4),
    ("qwen3", "qwen3", 0, (True, False), 4),
    ("deepseek", "llama", 0, (True,), 4),
    ("deepseek", "llama", 1, (True, False), 4),
    ("deepseek", "llama", 2, (True, False), 4),
]


def build_llama_cpp(jobs: int) -> Path:
    """libllama (CPU only, shared) and the logits driver; reused when already built."""
    src = kit.source(download=True)
    build = kit.WORK / f"build-{kit.SDIST_VERSION}"
    driver = build / "llama_logits"
    if driver.is_file():
        return driver
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
             "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF",
             "-DGGML_NATIVE=ON", "-DGGML_BLAS=OFF"]
    generator = ["-G", "Ninja"] if _which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, *flags], check=True)
    subprocess.run(["nice", "cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)], check=True)
    lib = build / "bin"
    subprocess.run(["cc", "-O2", str(HERE / "llama_logits.c"), "-I", str(src / "include"),
                    "-I", str(src / "ggml" / "include"), "-L", str(lib), "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{lib}", "-o", str(driver)], check=True)
    return driver


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None


def llama_cpp_commit() -> str:
    changelog = (kit.source().parent.parent / "CHANGELOG.md").read_text()
    section = changelog.split(f"## [{kit.SDIST_VERSION}]", 1)[1]
    return section.split("ggml-org/llama.cpp@", 1)[1].split()[0]


def llama_cpp_logits(driver: Path, gguf: Path, ids) -> "torch.Tensor":
    import numpy as np
    import torch

    out = gguf.with_suffix(".f32")
    done = subprocess.run([str(driver), str(gguf), str(out), *map(str, ids)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["llama.cpp failed"]
        raise RuntimeError(next((l for l in lines if "error loading model" in l), lines[-1]))
    return torch.from_numpy(np.fromfile(out, dtype=np.float32).reshape(len(ids), -1))


def transformers_logits(model_dir: Path, ids) -> "tuple[torch.Tensor, str]":
    """transformers' logits: the layout's class, or for DeepSeek its remote code when the output carries
    it, else the reference MoE block below on a Llama of the same attention."""
    import torch
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    x = torch.tensor([ids])
    if config["model_type"] == "deepseek" and not (model_dir / "modeling_deepseek.py").is_file():
        return _deepseek_reference(model_dir, config, x), "reference forward"
    remote = config["model_type"] == "deepseek"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                              trust_remote_code=remote).eval()
    with torch.no_grad():
        return model(x).logits[0], ("remote code" if remote else type(model).__name__)


def _deepseek_reference(model_dir: Path, config: dict, x) -> "torch.Tensor":
    """DeepSeek-MoE v1 from its description (softmax scores, top-k, optional renormalisation, ungated shared
    experts) on LlamaForCausalLM's attention, for outputs that do not carry the remote code."""
    import torch
    import transformers
    from safetensors.torch import load_file

    t = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        t.update(load_file(str(f)))
    keys = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")}
    keys["intermediate_size"] = config["moe_intermediate_size"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**keys)).eval()
    missing, unexpected = model.load_state_dict({k: v for k, v in t.items() if ".mlp." not in k}, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)

    def mlp(h, prefix):
        g, u, d = (t[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        return (torch.nn.functional.silu(h @ g.T) * (h @ u.T)) @ d.T

    class MoE(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.p = f"model.layers.{layer}.mlp"

        def forward(self, h):
            scores = torch.softmax(h @ t[f"{self.p}.gate.weight"].T, dim=-1)
            w, idx = torch.topk(scores, config["num_experts_per_tok"], dim=-1)
            if config["norm_topk_prob"]:
                w = w / w.sum(-1, keepdim=True)
            experts = torch.stack([mlp(h, f"{self.p}.experts.{e}") for e in range(config["n_routed_experts"])], -2)
            out = (torch.gather(experts, -2, idx.unsqueeze(-1).expand(*idx.shape, h.shape[-1])) * w.unsqueeze(-1))
            out = out.sum(-2)
            if config.get("n_shared_experts"):
                out = out + mlp(h, f"{self.p}.shared_experts")
            return out

    for layer, block in enumerate(model.model.layers):
        block.mlp = MoE(layer)
    with torch.no_grad():
        return model(x).logits[0]


def build(base: Path, experts, out: Path, layout: str, n_shared: int, renormalize) -> None:
    import moeforge

    cfg = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "architecture": layout,
           "experts": [{"source_model": str(e)} for e in experts]}
    if n_shared and experts[0] == base:  # identical experts: silent shared experts keep the dense function
        cfg["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0}] * n_shared
    elif n_shared:  # different experts: live shared experts, so that a dropped shared MLP shows
        cfg["shared_experts"] = [{"source_model": str(e)} for e in experts[:n_shared]]
    if renormalize is not None:
        cfg["renormalize"] = renormalize
    moeforge.build(cfg, out, quiet=True, allow_all_same=True, random_seed=0)


def declared(layout_name: str, n_routed: int, n_shared: int, renormalize) -> str:
    """llama.cpp's verdict in the layout's runtime facts, for this build."""
    from moeforge.layouts import layout_named
    from moeforge.layouts.base import MoEShape
    from moeforge.layouts.runtimes import LLAMA_CPP

    shape = MoEShape(n_routed, 2, kit.INTERMEDIATE, n_shared, kit.INTERMEDIATE * n_shared, renormalize is not False)
    return next(s.status for s in layout_named(layout_name).runtime_report(shape) if s.runtime == LLAMA_CPP)


def _deepseek_zero_shared(driver: Path, out: Path, ids, ref, kind: str) -> dict:
    """The same output with config.json edited to `n_shared_experts: 0`: the converter then runs, and
    llama.cpp's loader is what refuses it."""
    import shutil

    edited = out.with_name(out.name + "-zero")
    shutil.copytree(out, edited)
    config = json.loads((edited / "config.json").read_text())
    config["n_shared_experts"] = 0
    (edited / "config.json").write_text(json.dumps(config))
    done = kit.convert(edited, edited.with_suffix(".gguf"))
    diff = None
    if done.returncode != 0:
        result = "converter: " + done.stderr.strip().splitlines()[-1][-120:]
    else:
        try:
            diff = (llama_cpp_logits(driver, edited.with_suffix(".gguf"), ids) - ref).abs().max().item()
            result = "exact" if diff <= TOLERANCE else "differs"
        except RuntimeError as e:
            result = f"llama.cpp: {e}"[:160]
    return dict(layout="deepseek (n_shared_experts edited to 0)", routed=4, shared=0, renormalize="true",
                experts=kind, reader="-", vs_dense=None, diff=diff, result=result, declared="does not load",
                seconds=0)


def main() -> None:
    import logging

    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp")
    parser.add_argument("--only", default="", help="comma-separated layouts")
    args = parser.parse_args()
    logging.getLogger("moeforge").setLevel(logging.ERROR)
    torch.manual_seed(0)

    driver = build_llama_cpp(args.jobs)
    root = kit.WORK / "runtimes"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    bases, variants = {}, {}
    for family in ("llama", "qwen3"):
        bases[family] = kit.make_dense(root / f"{family}-base", family, seed=1)
        variants[family] = [kit.make_dense(root / f"{family}-x{i}", init_from=bases[family], seed=10 + i,
                                           mlp_noise=0.1) for i in range(4)]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(bases["llama"]))(TEXT)["input_ids"]
    dense = {f: transformers_logits(b, ids)[0] for f, b in bases.items()}

    rows = []
    only = set(filter(None, args.only.split(",")))
    for layout, family, n_shared, renorms, n_routed in CASES:
        if only and layout not in only:
            continue
        for renormalize in renorms:
            for kind in ("identical", "different"):
                experts = [bases[family]] * n_routed if kind == "identical" else variants[family][:n_routed]
                tag = f"{layout}-{n_routed}x-{n_shared}s-{renormalize}-{kind}"
                out = root / tag
                build(bases[family], experts, out, layout, n_shared, renormalize)
                start = time.time()
                ref, reader = transformers_logits(out, ids)
                vs_dense = (ref - dense[family]).abs().max().item() if kind == "identical" else None
                done = kit.convert(out, root / f"{tag}.gguf")
                if done.returncode != 0:
                    result, diff = "converter: " + done.stderr.strip().splitlines()[-1][-120:], None
                else:
                    try:
                        diff = (llama_cpp_logits(driver, root / f"{tag}.gguf", ids) - ref).abs().max().item()
                        result = "exact" if diff <= TOLERANCE else "differs"
                    except RuntimeError as e:
                        result, diff = f"llama.cpp: {e}"[:160], None
                row = dict(layout=layout, routed=n_routed, shared=n_shared,
                           renormalize="-" if renormalize is None else str(renormalize).lower(), experts=kind,
                           reader=reader, vs_dense=vs_dense, diff=diff, result=result,
                           declared=declared(layout, n_routed, n_shared, renormalize), seconds=round(time.time() - start, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if layout == "deepseek" and n_shared == 0:
                    rows.append(_deepseek_zero_shared(driver, out, ids, ref, kind))
                    print(json.dumps(rows[-1]), flush=True)

    print()
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine {platform.machine()} "
          f"{os.cpu_count()} cores; llama.cpp {llama_cpp_commit()} (llama-cpp-python {kit.SDIST_VERSION}); "
          f"transformers {transformers.__version__}; torch {torch.__version__}; tolerance {TOLERANCE}")
    print("| layout | routed | shared | renormalize | experts | transformers reads as | transformers vs dense base "
          "| llama.cpp vs transformers | llama.cpp | declared | agrees |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
        measured = "exact" if r["result"] == "exact" else ("differs" if r["result"] == "differs" else "does not load")
        agrees = "yes" if measured == r["declared"] else "**NO**"
        print(f"| {r['layout']} | {r['routed']} | {r['shared']} | {r['renormalize']} | {r['experts']} | {r['reader']} "
              f"| {fmt(r['vs_dense'])} | {fmt(r['diff'])} | {r['result']} | {r['declared']} | {agrees} |")


if __name__ == "__main__":
    main()
