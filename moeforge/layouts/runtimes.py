"""Which runtimes read a layout, and where one computes something other than transformers.

Each layout module declares a `Runtime` per runtime people deploy to; a `Caveat` says under which settings
(the build's `MoEShape`) that runtime departs, how, and what to do instead. The build warns with
`warnings()` and the model card prints `report()`. The facts come from running the runtime
(benchmarks/runtimes.py, docs/runtimes.md) or, for vLLM, from reading its model code; `MEASURED` names
the versions they hold for.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, List, Sequence, Tuple

if TYPE_CHECKING:
    from moeforge.layouts.base import MoEShape

TRANSFORMERS, VLLM, LLAMA_CPP = "transformers", "vLLM", "llama.cpp"

# The versions the facts below were measured (or, for vLLM, read) with; benchmarks/runtimes.py re-measures.
MEASURED = {
    TRANSFORMERS: "5.24.0",
    VLLM: "model code read, not run (qwen2_moe.py 002fb90, qwen3_moe.py 002456d, deepseek_v2.py 002d607, mixtral.py 005df92)",
    LLAMA_CPP: "0c1e57098 (llama-cpp-python 0.3.36): convert_hf_to_gguf.py, CPU, f32 weights and KV cache",
}

EXACT, DIFFERS, FAILS = "exact", "differs", "does not load"


@dataclasses.dataclass(frozen=True)
class Caveat:
    """Under `when`, the runtime `effect`s (DIFFERS or FAILS) because `reason`; `remedy` says what to do."""

    when: Callable[["MoEShape"], bool]
    effect: str
    reason: str
    remedy: str = ""


@dataclasses.dataclass(frozen=True)
class Runtime:
    name: str  # TRANSFORMERS, VLLM or LLAMA_CPP
    reads_as: str  # the class, graph or code that runs the layout there
    caveats: Tuple[Caveat, ...] = ()


@dataclasses.dataclass(frozen=True)
class RuntimeStatus:
    """One runtime's verdict for one build: EXACT, DIFFERS or FAILS, with why and what to do."""

    runtime: str
    reads_as: str
    status: str
    detail: str = ""
    measured: str = ""

    def warning(self) -> str:
        return f"{self.runtime} ({self.reads_as}) {self.status} for this model: {self.detail}"


def report(runtimes: Sequence[Runtime], shape: "MoEShape") -> List[RuntimeStatus]:
    """Every runtime's verdict on a build of this shape: the first caveat that applies, else exact."""
    out = []
    for rt in runtimes:
        hit = next((c for c in rt.caveats if c.when(shape)), None)
        if hit is None:
            out.append(RuntimeStatus(rt.name, rt.reads_as, EXACT, "", MEASURED[rt.name]))
        else:
            detail = hit.reason + (f"; {hit.remedy}" if hit.remedy else "")
            out.append(RuntimeStatus(rt.name, rt.reads_as, hit.effect, detail, MEASURED[rt.name]))
    return out


def warnings(runtimes: Sequence[Runtime], shape: "MoEShape") -> List[str]:
    """One line per runtime that will not compute what transformers computes, naming it."""
    return [s.warning() for s in report(runtimes, shape) if s.status != EXACT]


def _partial_top_k(shape: "MoEShape") -> bool:
    """Renormalising changes nothing when every expert is active (the softmax already sums to 1)."""
    return shape.experts_per_token < shape.num_experts


# llama.cpp graphs that never renormalise the top-k weights (build_moe_ffn(..., norm_w=false, ...)).
LLAMA_CPP_IGNORES_NORM_TOPK = Caveat(
    when=lambda s: s.renormalize and _partial_top_k(s),
    effect=DIFFERS,
    reason="its graph never renormalises the top-k router weights, and this model's config says "
           "norm_topk_prob: true",
    remedy="build with `renormalize: false` for a model that computes the same in transformers, vLLM and "
           "llama.cpp (identical experts then scale the dense MLP by their top-k router weight instead of "
           "reproducing it)",
)
# llama.cpp graphs that always renormalise (build_moe_ffn(..., norm_w=true, ...)).
LLAMA_CPP_ALWAYS_NORM_TOPK = Caveat(
    when=lambda s: not s.renormalize and _partial_top_k(s),
    effect=DIFFERS,
    reason="its graph always renormalises the top-k router weights, and this model's config says "
           "norm_topk_prob: false",
    remedy="build with `renormalize: true` (the default) for a model that computes the same everywhere",
)
