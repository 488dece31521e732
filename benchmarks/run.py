"""Wall time and peak RSS of moeforge, mergekit-moe and `cp -r` of the output, side by side.

    python benchmarks/run.py                       # both sizes, random gates, 3 rounds
    python benchmarks/run.py --sizes large --rounds 5 --gates random cheap_embed

Generates the dense checkpoints (benchmarks/make_checkpoints.py), makes a virtualenv with mergekit-moe 0.1.5
from the package registry (or reuses $MERGEKIT_VENV), then runs the tools alternately, rotating their order
each round, and prints medians with the spread. Outputs live under benchmarks/work/ and are removed at the end.

moeforge records the sha256 of every source file in its manifest and remembers them across builds (stat
identity): "moeforge" runs with a source-hash cache primed by one untimed build, as for a user's rebuilds
from the same experts; "moeforge (first build)" starts every run from an empty cache and hashes all sources.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (WORK, dir_bytes, measure, mergekit_cmd, mergekit_venv, models, moeforge_cmd, remove,  # noqa: E402
                    set_cache, settle, write_config)

CACHE_DIR_ENV = "MOEFORGE_CACHE_DIR"  # moeforge.writer.hashing: where source hashes are remembered
FIRST_BUILD = "moeforge (first build)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "large"], choices=["small", "large"])
    p.add_argument("--gates", nargs="+", default=["random"],
                   choices=["random", "uniform_random", "cheap_embed", "hidden"])
    p.add_argument("--dtype", default="bfloat16", help="output dtype (the sources are bfloat16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tools", nargs="+", default=["moeforge", "mergekit", "cp"], choices=["moeforge", "mergekit", "cp"])
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=SRC",
                   help="also time moeforge from another source tree, e.g. before=/tmp/old (a checkout's root)")
    p.add_argument("--mergekit-venv", help="existing virtualenv with mergekit-moe (default: $MERGEKIT_VENV or create one)")
    p.add_argument("--out-shard-size", default=None, help="passed to both tools")
    p.add_argument("--cache", choices=["warm", "cold"], default="warm",
                   help="before each run, read the inputs into the page cache (warm) or drop them from it (cold); "
                        "for cp -r the input is moeforge's output")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    args = p.parse_args()

    venv = mergekit_venv(args.mergekit_venv) if "mergekit" in args.tools else None
    runs = []
    for size in args.sizes:
        dirs = models(size)
        for gate in args.gates:
            config = write_config(WORK / f"{size}-{gate}-{args.dtype}.yml", dirs, gate, args.dtype)
            runs += bench(size, gate, config, dirs, venv, args)
    results = WORK / "results.jsonl"
    with open(results, "a") as f:
        for r in runs:
            f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print(table(runs, args.rounds))
    print(f"\n(raw runs appended to {results})")


def bench(size, gate, config, sources, venv, args):
    shard = ["--out-shard-size", args.out_shard_size] if args.out_shard_size else []
    tools = []
    for name in args.tools:
        if name == "moeforge":
            tools += [("moeforge", None), (FIRST_BUILD, None)]
            tools += [(f"moeforge ({label})", src) for label, src in (v.split("=", 1) for v in args.variant)]
        elif name == "mergekit":
            tools.append(("mergekit-moe", None))
    outs = {name: WORK / f"out-{size}-{i}" for i, (name, _) in enumerate(tools)}
    copy_of = WORK / f"out-{size}-cp"
    runs = []
    hash_cache = WORK / "hash-cache"
    try:
        if "moeforge" in args.tools:  # untimed: primes the source-hash cache (and the page cache)
            remove(outs["moeforge"])
            measure(moeforge_cmd(config, outs["moeforge"], extra=shard), env={CACHE_DIR_ENV: str(hash_cache)})
        for rnd in range(args.rounds):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            for name, src in order:
                out = outs[name]
                remove(out)
                settle()
                set_cache(sources, args.cache)
                env = {CACHE_DIR_ENV: str(hash_cache)}
                if name.startswith("moeforge"):
                    cmd = moeforge_cmd(config, out, extra=shard, src=src)
                    if name == FIRST_BUILD:
                        remove(WORK / "hash-cache-empty")
                        env = {CACHE_DIR_ENV: str(WORK / "hash-cache-empty")}
                else:
                    cmd = mergekit_cmd(venv, config, out, extra=shard)
                m = measure(cmd, env=env)
                runs.append(dict(size=size, gate=gate, dtype=args.dtype, cache=args.cache, tool=name, round=rnd, **vars(m),
                                 out_bytes=dir_bytes(out)))
                print(f"{size} {gate} round {rnd}: {name}: {m.wall_s:.1f} s, {m.peak_rss / 2**20:.0f} MiB", file=sys.stderr)
                if name == "moeforge" and "cp" in args.tools:
                    remove(copy_of)
                    settle()
                    set_cache([out], args.cache)
                    m = measure(["cp", "-r", str(out), str(copy_of)])
                    runs.append(dict(size=size, gate=gate, dtype=args.dtype, cache=args.cache, tool="cp -r", round=rnd, **vars(m),
                                     out_bytes=dir_bytes(copy_of)))
                    # the same copy made durable as moeforge makes its output: fsync every file (sync FILE...)
                    f = measure(["sync", *map(str, sorted(p for p in copy_of.rglob("*") if p.is_file()))])
                    runs.append(dict(size=size, gate=gate, dtype=args.dtype, cache=args.cache, tool="cp -r + fsync",
                                     round=rnd, wall_s=m.wall_s + f.wall_s, cpu_s=m.cpu_s + f.cpu_s,
                                     peak_rss=max(m.peak_rss, f.peak_rss), out_bytes=dir_bytes(copy_of)))
                    print(f"{size} {gate} round {rnd}: cp -r: {m.wall_s:.1f} s, then fsync {f.wall_s:.1f} s", file=sys.stderr)
                    remove(copy_of)
    finally:
        if not args.keep:
            for out in list(outs.values()) + [copy_of]:
                remove(out)
    return runs


def table(runs, rounds) -> str:
    groups = {}
    for r in runs:
        groups.setdefault((r["size"], r["gate"]), {}).setdefault(r["tool"], []).append(r)
    lines = [
        f"| config | tool | wall, median of {rounds} (min-max) | CPU (user+sys), median | peak RSS, median (min-max) "
        "| wall / cp -r | mergekit-moe wall / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for (size, gate), tools in groups.items():
        med = {t: statistics.median(r["wall_s"] for r in rs) for t, rs in tools.items()}
        out_gb = max(r["out_bytes"] for rs in tools.values() for r in rs) / 1e9
        for tool, rs in tools.items():
            walls = [r["wall_s"] for r in rs]
            rss = [r["peak_rss"] / 2**30 for r in rs]
            vs_cp = f"{med[tool] / med['cp -r']:.2f}x" if "cp -r" in med else ""
            if "cp -r + fsync" in med and not tool.startswith("cp"):
                vs_cp += f" ({med[tool] / med['cp -r + fsync']:.2f}x of cp -r + fsync)"
            vs_mk = f"{med['mergekit-moe'] / med[tool]:.1f}x" if "mergekit-moe" in med and tool != "cp -r" else ""
            lines.append(
                f"| {size}, {gate}, {rs[0]['dtype']} out, {out_gb:.2f} GB, {rs[0]['cache']} cache | {tool} | {statistics.median(walls):.1f} s "
                f"({min(walls):.1f}-{max(walls):.1f}) | {statistics.median(r['cpu_s'] for r in rs):.1f} s "
                f"| {statistics.median(rss):.2f} GiB ({min(rss):.2f}-{max(rss):.2f}) "
                f"| {vs_cp} | {vs_mk} |"
            )
    sizes = sorted({s for s, _ in groups}, key=["small", "large"].index)
    if sizes == ["small", "large"]:
        lines += ["", "| growth small -> large | wall | peak RSS |", "|---|---|---|"]
        for gate in sorted({g for _, g in groups}):
            small, large = groups.get(("small", gate), {}), groups.get(("large", gate), {})
            for tool in large:
                if tool in small:
                    w = statistics.median(r["wall_s"] for r in large[tool]) / statistics.median(r["wall_s"] for r in small[tool])
                    m = statistics.median(r["peak_rss"] for r in large[tool]) / statistics.median(r["peak_rss"] for r in small[tool])
                    lines.append(f"| {tool} ({gate}) | {w:.1f}x | {m:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
