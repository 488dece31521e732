"""Build the same config with moeforge and mergekit-moe 0.1.5 (same seed) and compare every tensor.

    python benchmarks/compare_mergekit.py                      # small models, bf16, all four gate modes
    python benchmarks/compare_mergekit.py --size large --gates random
    python benchmarks/compare_mergekit.py --corpus             # tests/data/mergekit_configs/*.yml, tiny stand-ins
    python benchmarks/compare_mergekit.py --options            # tests/data/mergekit_moe_options.txt == its --help

mergekit 0.1.5 writes transformers-5's fused in-memory names for Mixtral and Qwen3-MoE; they are mapped to
moeforge's per-expert names:
  mlp.experts.gate_up_proj [E, 2I, H]  ->  experts.{e}.w1 / gate_proj (rows :I) and w3 / up_proj (rows I:)
  mlp.experts.down_proj    [E, H, I]   ->  experts.{e}.w2 / down_proj
  mlp.gate.weight          [E, H]      ->  block_sparse_moe.gate.weight
Routers must agree to the output dtype's precision (--router-ulps, default 1 unit in the last place); every other
tensor must be bit for bit identical. Hidden modes are compared at bfloat16 precision whatever the output dtype:
mergekit runs the base model in bfloat16 and normalises the router rows in bfloat16 too (moeforge in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, measure, mergekit_cmd, mergekit_venv, models, moeforge_cmd, remove, write_config  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(?:gate|shared_expert_gate)\.weight$")
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class Shards:
    """Tensor name -> file over a (possibly sharded) safetensors output; tensors read one at a time."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        index = root / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self.handles = [safe_open(str(root / f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, name):
        return self.where[name].get_tensor(name)


def mergekit_view(mk: Shards, name: str):
    """The mergekit tensor that holds moeforge's `name`, or None."""
    if name in mk.where:
        return mk.get(name)
    m = _EXPERT.match(name)
    if m:
        layer, e, role = int(m.group(1)), int(m.group(2)), m.group(3)
        prefix = f"model.layers.{layer}.mlp.experts"
        if role in ("w2", "down_proj"):
            return mk.get(f"{prefix}.down_proj")[e] if f"{prefix}.down_proj" in mk.where else None
        if f"{prefix}.gate_up_proj" not in mk.where:
            return None
        fused = mk.get(f"{prefix}.gate_up_proj")[e]
        half = fused.shape[0] // 2
        return fused[:half] if role in ("w1", "gate_proj") else fused[half:]
    m = _ROUTER.match(name)
    if m and f"model.layers.{m.group(1)}.mlp.gate.weight" in mk.where:
        return mk.get(f"model.layers.{m.group(1)}.mlp.gate.weight")
    return None


def row_ulps(a, b, precision=None) -> float:
    """Largest difference in each router row, in units in the last place (of `precision`, default the tensors'
    dtype) at that row's largest magnitude: rounding one float32 row two ways can differ by 1."""
    import torch

    dtype = precision or a.dtype
    a, b = a.float(), b.float()
    top = torch.maximum(a.abs().amax(dim=-1), b.abs().amax(dim=-1)).clamp(min=torch.finfo(torch.float32).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(top))) * torch.finfo(dtype).eps
    return float(((a - b).abs().amax(dim=-1) / ulp).max())


def bytes_of(t) -> bytes:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def compare(mf_dir: Path, mk_dir: Path, router_precision=None) -> dict:
    """Every moeforge tensor against mergekit's; routers measured in ulps of `router_precision`."""
    import torch

    mf, mk = Shards(mf_dir), Shards(mk_dir)
    result = {"tensors": 0, "routers": 0, "routers_identical": 0, "others_identical": 0, "different": [],
              "missing": [], "router_max_abs": 0.0, "router_max_ulps": 0.0, "router_min_cosine": 1.0}
    covered = set()
    for name in sorted(mf.where):
        a = mf.get(name)
        b = mergekit_view(mk, name)
        result["tensors"] += 1
        if b is None:
            result["missing"].append(name)
            continue
        covered.add(name)
        if _ROUTER.match(name):
            result["routers"] += 1
            diff = (a.float() - b.float()).abs()
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()
            result["router_max_abs"] = max(result["router_max_abs"], diff.max().item())
            result["router_max_ulps"] = max(result["router_max_ulps"], row_ulps(a, b, router_precision) if a.dtype == b.dtype else float("inf"))
            result["router_min_cosine"] = min(result["router_min_cosine"], cos)
            if a.dtype == b.dtype and torch.equal(a, b):
                result["routers_identical"] += 1
        elif a.dtype == b.dtype and a.shape == b.shape and bytes_of(a) == bytes_of(b):
            result["others_identical"] += 1
        else:
            result["different"].append(name)
    mk_names = {n for n in mk.where}
    fused = {n for n in mk_names if n.endswith(_FUSED + ("mlp.gate.weight",))}
    result["mergekit_only"] = sorted(n for n in mk_names - fused if n not in covered)
    return result


def check_options(venv: Path) -> bool:
    """The checked-in option list (what the tests feed moeforge) against the real `mergekit-moe --help`."""
    sys.path.insert(0, str(TESTS))
    from mergekit_corpus import OPTIONS_FILE, checked_in_options, parse_help_options

    env = {**os.environ, "COLUMNS": "200"}
    text = subprocess.run([str(venv / "bin" / "mergekit-moe"), "--help"], capture_output=True, text=True, check=True,
                          env=env).stdout
    real, listed = parse_help_options(text), checked_in_options()
    for decl in real:
        if decl not in listed:
            print(f"missing from {OPTIONS_FILE.name}: {decl}")
    for decl in listed:
        if decl not in real:
            print(f"not in mergekit-moe --help: {decl}")
    print(f"{len(real)} options in mergekit-moe --help; {len(listed)} in {OPTIONS_FILE.name}: "
          + ("the same" if real == listed else "DIFFERENT"))
    return real == listed


def _failure(error: Exception) -> str:
    """The line of a failed run's log that says why."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip() and not l.strip().startswith("For further")]
    for i, l in enumerate(lines):  # pydantic: the field, then its message
        if re.search(r"validation errors? for", l) and i + 2 < len(lines):
            return f"{lines[i + 1]}: {lines[i + 2].split(' [type=')[0]}"
    logged = [l.split(":", 2)[2].strip() for l in lines if l.startswith("ERROR:")]  # logging.error: the first says why
    said = [l for l in lines if re.search(r"error|Error|refuse", l) and "Traceback" not in l]
    line = (logged[:1] or said[-1:] or lines[-1:] or ["?"])[0]
    line = re.sub(r"/\S*/(\S+)", r"\1", line)  # no machine paths in the table
    return line[:120].replace("|", "/")


def run_corpus(venv: Path, seed: int, keep: bool, only=()) -> list:
    """Every corpus config (or those whose names start with one of `only`) built by both tools; one row each."""
    import torch

    sys.path.insert(0, str(TESTS))
    from mergekit_corpus import corpus, make_standins, substitute

    paths = make_standins(WORK / "corpus-models")
    rows = []
    for path in corpus():
        if only and not path.stem.startswith(tuple(only)):
            continue
        text = path.read_text(encoding="utf-8")
        config = WORK / "corpus" / path.name
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(substitute(text, paths), encoding="utf-8")
        note = " ".join(re.findall(r"^#\s*parity:\s*(.+?)\s*$", text, flags=re.MULTILINE))
        mode = (re.search(r"^gate_mode:\s*\"?(\w+)", text, flags=re.MULTILINE) or [None, "hidden"])[1]
        outs = {tool: WORK / f"corpus-{tool}-{path.stem}" for tool in ("moeforge", "mergekit")}
        errors = {}
        for tool, cmd in (("moeforge", moeforge_cmd(config, outs["moeforge"], seed=seed)),
                          ("mergekit", mergekit_cmd(venv, config, outs["mergekit"], seed=seed))):
            remove(outs[tool])
            try:
                measure(cmd, log=WORK / "corpus" / f"{path.stem}-{tool}.log")
            except RuntimeError as e:
                errors[tool] = _failure(e)
        r = None
        if not errors:
            r = compare(outs["moeforge"], outs["mergekit"], torch.bfloat16 if mode.startswith("hidden") else None)
        if not keep:
            for out in outs.values():
                remove(out)
        rows.append((path.stem, mode, errors, r, note))
        print(f"{path.stem}: {errors or json.dumps(r)}", file=sys.stderr)
    return rows


def corpus_table(rows: list) -> str:
    out = ["| config | gate_mode | moeforge | mergekit-moe 0.1.5 | non-router tensors bit-identical "
           "| routers: max diff in ulps at row scale (min cosine) | note |", "|---|---|---|---|---|---|---|"]
    for name, mode, errors, r, note in rows:
        mf = "builds" if "moeforge" not in errors else f"refuses: {errors['moeforge']}"
        mk = "builds" if "mergekit" not in errors else f"fails: {errors['mergekit']}"
        if r is None:
            same, routers = "-", "-"
        else:
            others = r["tensors"] - r["routers"]
            same = f"{r['others_identical']}/{others}" + (f" ({len(r['mergekit_only'])} only in mergekit's)"
                                                          if r["mergekit_only"] else "")
            routers = ("identical" if r["routers_identical"] == r["routers"]
                       else f"{r['router_max_ulps']:.2f} ({r['router_min_cosine']:.6f})")
        out.append(f"| {name} | {mode} | {mf} | {mk} | {same} | {routers} | {note} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=["small", "large"])
    p.add_argument("--gates", nargs="+", default=["random", "uniform_random", "cheap_embed", "hidden", "hidden:one-prompt"],
                   help="gate modes; MODE:one-prompt gives every expert a single prompt (no padded batches)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mergekit-venv", help="existing virtualenv with mergekit-moe (default: $MERGEKIT_VENV or create one)")
    p.add_argument("--router-ulps", type=float, default=None,
                   help="router tolerance in units in the last place at the row's scale (default 1; 2 for hidden modes "
                        "with padded prompt batches, where mergekit's left padding shifts RoPE positions)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--corpus", nargs="*", metavar="PREFIX",
                   help="build tests/data/mergekit_configs/*.yml with both tools (only those starting with a PREFIX)")
    p.add_argument("--options", action="store_true", help="check tests/data/mergekit_moe_options.txt against --help")
    args = p.parse_args()
    import torch

    venv = mergekit_venv(args.mergekit_venv)
    if args.options:
        sys.exit(0 if check_options(venv) else 1)
    if args.corpus is not None:
        print(corpus_table(run_corpus(venv, args.seed, args.keep, args.corpus)))
        return
    dirs = models(args.size)
    rows = []
    for gate in args.gates:
        mode, _, variant = gate.partition(":")
        one_prompt = variant == "one-prompt"
        tag = gate.replace(":", "-")
        config = write_config(WORK / f"cmp-{args.size}-{tag}-{args.dtype}.yml", dirs, mode, args.dtype, one_prompt)
        mf_out, mk_out = WORK / f"cmp-moeforge-{tag}", WORK / f"cmp-mergekit-{tag}"
        tolerance = args.router_ulps if args.router_ulps is not None else (
            2.0 if mode.startswith("hidden") and not one_prompt else 1.0)
        remove(mf_out)
        remove(mk_out)
        try:
            measure(moeforge_cmd(config, mf_out, seed=args.seed))
            measure(mergekit_cmd(venv, config, mk_out, seed=args.seed))
            r = compare(mf_out, mk_out, torch.bfloat16 if mode.startswith("hidden") else None)
        finally:
            if not args.keep:
                remove(mf_out)
                remove(mk_out)
        ok = (r["others_identical"] == r["tensors"] - r["routers"] and not r["mergekit_only"]
              and r["router_max_ulps"] <= tolerance)
        rows.append((gate, r, ok, tolerance))
        print(f"{gate}: {json.dumps(r)}", file=sys.stderr)
    print(f"| gate_mode ({args.size}, {args.dtype} out) | tensors | non-router tensors bit-identical | routers identical "
          "| router max abs diff | router max diff, ulps at row scale | router rows min cosine | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for gate, r, ok, tolerance in rows:
        print(f"| {gate} | {r['tensors']} | {r['others_identical']}/{r['tensors'] - r['routers']} "
              f"| {r['routers_identical']}/{r['routers']} "
              f"| {r['router_max_abs']:.3g} | {r['router_max_ulps']:.2f} | {r['router_min_cosine']:.6f} "
              f"| {f'match (routers <= {tolerance:g} ulp)' if ok else 'MISMATCH'} |")
        if r["different"] or r["missing"] or r["mergekit_only"]:
            print(f"  different: {r['different'][:5]} missing: {r['missing'][:5]} mergekit only: {r['mergekit_only'][:5]}")


if __name__ == "__main__":
    main()
