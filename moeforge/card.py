"""Model cards (README.md) for what moeforge writes: Hub metadata for search and lineage, plus provenance.

`make_card` takes plain data so that every exporter (the MoE build, the WEMoE export) writes the same kind
of card; `build_card` adapts a build's inputs to it.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from moeforge._version import __version__
from moeforge.files import CARD, RESOLVED_CONFIG
from moeforge.gate_modes import GATE_MODES
from moeforge.units import human_count

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from moeforge.layouts.runtimes import RuntimeStatus
    from moeforge.pipeline.inputs import Inputs

log = logging.getLogger("moeforge")

# Placeholder for the usage snippet when the repo id is not known yet; `moeforge upload` fills it in.
MODEL_ID_PLACEHOLDER = "path/to/this/model"
MODEL_ID_LINE = re.compile(r'^model_id = "[^"\n]*"$', re.MULTILINE)
_MAX_PROMPT = 200


@dataclasses.dataclass(frozen=True)
class License:
    id: str  # a Hub license id, or "other" with a name and link
    name: Optional[str] = None
    link: Optional[str] = None

    def __str__(self) -> str:
        return self.id if not self.name else f"{self.id} ({self.name})"


@dataclasses.dataclass(frozen=True)
class CardSource:
    """One input model as the config names it, with what is known of its license and exact revision."""

    ref: str
    license: Optional[License] = None
    commit: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CardExpert:
    source: str  # the reference as written in the config (or the per-layer sources, joined)
    positive_prompts: Sequence[str] = ()
    negative_prompts: Sequence[str] = ()
    shared: bool = False
    models: Sequence[str] = ()  # every model it draws on, when more than `source` (per-layer experts)


def make_card(
    *,
    base_model: str,
    experts: Sequence[CardExpert],
    sources: Sequence[CardSource],
    layout: str,
    total_params: int,
    active_params: int,
    config_text: str,
    config_name: str = RESOLVED_CONFIG,
    gate_mode: Optional[str] = None,
    experts_per_token: Optional[int] = None,
    model_id: Optional[str] = None,
    title: Optional[str] = None,
    summary: Optional[str] = None,
    usage: Optional[str] = None,
    pipeline_tag: Optional[str] = "text-generation",
    tags: Sequence[str] = (),
    runtimes: Sequence["RuntimeStatus"] = (),
) -> "ModelCard":
    """The card: Hub front matter, then layout, parameters, experts, gate mode, exact config and usage.

    `sources` carries licenses and commits (see `source_info`); refs missing from it count as unknown.
    `summary` replaces the opening sentence, `usage` (Markdown) the transformers snippet. `runtimes` (the
    layout's `runtime_report`) becomes a table of the runtimes that load the model, exactly or how not.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from moeforge.sources.resolve import hub_id

    refs = _unique([base_model] + [m for e in experts for m in (e.models or [e.source])])
    known = {s.ref: s for s in sources}
    hub_ids = _unique([i for i in (hub_id(r) for r in refs) if i])
    license_ = common_license([known[r].license if r in known else None for r in refs])
    extra = {"base_model_relation": "merge"} if hub_ids else {}
    data = ModelCardData(
        base_model=hub_ids or None,
        library_name="transformers",
        license=license_.id if license_ else None,
        license_name=license_.name if license_ else None,
        license_link=license_.link if license_ else None,
        pipeline_tag=pipeline_tag,
        tags=_unique(["moe", "merge", "moeforge", layout, *tags]),
        **extra,
    )
    routed = [e for e in experts if not e.shared]
    title = title or (model_id.split("/")[-1] if model_id else f"{_short(base_model)} MoE ({len(routed)} experts)")
    top = f" ({experts_per_token} active per token)" if experts_per_token else ""
    summary = summary or (
        f"A Mixture-of-Experts model built with moeforge {__version__}: {len(routed)} experts{top} in the "
        f"**{layout}** layout, on top of {_link(base_model)}."
    )
    lines = [f"# {title}", "", summary, "", "| | |", "|---|---|", f"| layout | {layout} |"]
    lines.append(f"| parameters | {_count(total_params)} total, {_count(active_params)} active per token |")
    lines.append(f"| experts | {len(routed)}{f', top-{experts_per_token}' if experts_per_token else ''} |")
    if gate_mode:
        desc = GATE_MODES[gate_mode].card if gate_mode in GATE_MODES else None
        lines.append(f"| router (gate_mode) | `{_cell(gate_mode)}`{': ' + desc if desc else ''} |")
    lines.append(f"| base model | {_link(base_model)} |")
    lines.append(f"| license | {_cell(str(license_)) if license_ else _license_note(refs, known)} |")
    lines += ["", "## Experts", "", "| # | source | positive prompts | negative prompts |", "|---|---|---|---|"]
    index = 0
    for e in experts:
        label = "shared" if e.shared else str(index)
        index += 0 if e.shared else 1
        lines.append(f"| {label} | {_link(e.source)} | {_prompts(e.positive_prompts)} | {_prompts(e.negative_prompts)} |")
    lines += ["", "## Sources", "", "| model | revision | license |", "|---|---|---|"]
    for ref in refs:
        src = known.get(ref, CardSource(ref))
        lines.append(f"| {_link(ref)} | {f'`{src.commit}`' if src.commit else '-'} | {_cell(str(src.license or 'unknown'))} |")
    if runtimes:
        lines += ["", "## Runtimes", "", _runtimes_intro(runtimes), "",
                  "| runtime | reads it as | result | measured with |", "|---|---|---|---|"]
        for r in runtimes:
            result = r.status + (f": {r.detail}" if r.detail else "")
            lines.append(f"| {r.runtime} | {_cell(r.reads_as)} | {_cell(result)} | {_cell(r.measured)} |")
    lines += ["", "## Configuration", "", f"The exact recipe, also in this repository as `{config_name}`:", ""]
    lines += [_fenced(config_text.rstrip("\n"), "yaml"), "", "## Usage", ""]
    lines.append(usage.rstrip("\n") if usage else _transformers_usage(model_id, experts))
    body = "\n".join(lines) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def common_license(licenses: Sequence[Optional[License]]) -> Optional[License]:
    """The license every source has, or None when one is unknown or they differ (the user must choose)."""
    if not licenses or any(lic is None for lic in licenses) or len(set(licenses)) != 1:
        return None
    return licenses[0]


def source_info(ref: str, path: Path) -> CardSource:
    """License from the source's README front matter (else config.json), and its commit when from the Hub cache."""
    path = Path(path)
    commit = path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    return CardSource(ref, license_of(path), commit)


def license_of(model_dir: Path) -> Optional[License]:
    meta: Dict = {}
    readme = Path(model_dir) / CARD
    if readme.is_file():
        from huggingface_hub import metadata_load

        try:
            meta = metadata_load(readme) or {}
        except Exception as e:  # a malformed card only means the license is unknown
            log.debug("%s: unreadable front matter (%s)", readme, e)
    if not meta.get("license"):
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
            meta = config if isinstance(config, dict) else {}
        except (OSError, ValueError):
            meta = {}
    lic = meta.get("license")
    if not isinstance(lic, str) or not lic.strip():
        return None
    name, link = meta.get("license_name"), meta.get("license_link")
    return License(lic.strip(), name if isinstance(name, str) else None, link if isinstance(link, str) else None)


def build_card(inputs: "Inputs", plan, config_text: str, config_name: str = RESOLVED_CONFIG) -> "ModelCard":
    """The card of a `moeforge build`, from its inputs and plan."""
    sources = [source_info(ref, ckpt.path) for ref, ckpt in inputs.checkpoints.items()]
    return recipe_card(inputs.config, sources, inputs.layout.name, plan, config_text, inputs.experts_per_token,
                       config_name=config_name, model_id=inputs.options.push_to_hub,
                       runtimes=inputs.layout.runtime_report(plan.shape))


def recipe_card(config, sources: Sequence[CardSource], layout: str, plan, config_text: str, experts_per_token: int,
                config_name: str = RESOLVED_CONFIG, model_id: Optional[str] = None,
                runtimes: Sequence["RuntimeStatus"] = ()) -> "ModelCard":
    """The card of an MoE whose recipe (`MoEConfig`) is known: built, or edited by `moeforge add-expert`."""
    experts = [
        CardExpert(e.label, e.positive_prompts or (), e.negative_prompts or (), shared=shared, models=e.models())
        for shared, group in ((False, config.experts), (True, config.shared_experts or ()))
        for e in group
    ]
    return make_card(
        base_model=config.base_model, experts=experts, sources=sources, layout=layout,
        total_params=plan.total_params, active_params=plan.active_params, config_text=config_text,
        config_name=config_name, gate_mode=config.gate_mode, experts_per_token=experts_per_token, model_id=model_id,
        runtimes=runtimes,
    )


def _runtimes_intro(runtimes: Sequence["RuntimeStatus"]) -> str:
    odd = [r.runtime for r in runtimes if r.status != "exact"]
    if not odd:
        return "Every runtime below computes what transformers computes for this model (to float32 rounding)."
    return (f"**Not the same model in {' and '.join(odd)}** (see its row); the other runtimes below compute "
            "what transformers computes (to float32 rounding).")


def dense_card(source: str, expert: int, model_type: str, params: int, license_: Optional[License]) -> "ModelCard":
    """The card of a dense model that `moeforge extract` took out of an MoE: expert `expert` with its attention."""
    from huggingface_hub import ModelCard, ModelCardData

    from moeforge.sources.resolve import hub_id

    repo = hub_id(source)
    data = ModelCardData(
        base_model=[repo] if repo else None, library_name="transformers", pipeline_tag="text-generation",
        license=license_.id if license_ else None, license_name=license_.name if license_ else None,
        license_link=license_.link if license_ else None, tags=["moeforge", "extract", model_type],
    )
    lines = [
        f"# {_short(source)}: expert {expert}", "",
        f"A dense **{model_type}** model: routed expert {expert} of the Mixture-of-Experts {_link(source)} as its "
        f"MLP, with that model's attention, embeddings and norms, extracted with moeforge {__version__} "
        "(`moeforge extract`).", "",
        "| | |", "|---|---|", f"| model type | {model_type} |", f"| parameters | {_count(params)} |",
        f"| taken from | {_link(source)}, expert {expert} |",
        f"| license | {_cell(str(license_)) if license_ else 'as the source MoE (unknown)'} |", "",
        "## Usage", "", _transformers_usage(None, []),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def fill_model_id(card_text: str, repo_id: str) -> str:
    """The card with its usage snippet pointing at `repo_id` (used on upload; the local file is untouched)."""
    return MODEL_ID_LINE.sub(f"model_id = {json.dumps(repo_id)}", card_text, count=1)


def _transformers_usage(model_id: Optional[str], experts: Sequence[CardExpert]) -> str:
    prompt = next((p for e in experts for p in e.positive_prompts), "Hello, my name is")
    code = "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model_id = {json.dumps(model_id or MODEL_ID_PLACEHOLDER)}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
        f"inputs = tokenizer({json.dumps(prompt)}, return_tensors=\"pt\").to(model.device)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
    ])
    return _fenced(code, "python")


def _license_note(refs: Sequence[str], known: Dict[str, CardSource]) -> str:
    found = {str(known[r].license) if r in known and known[r].license else "unknown" for r in refs}
    why = "are unknown" if found == {"unknown"} else "differ or are unknown for some"
    return f"not set: the sources' licenses {why} (see Sources); choose one that respects every source's terms"


def _unique(items) -> List:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _short(ref: str) -> str:
    return ref.rstrip("/").split("@")[0].split("/")[-1] or ref


def _link(ref: str) -> str:
    from moeforge.sources.resolve import hub_id

    repo = hub_id(ref)
    return f"[{_cell(ref)}](https://huggingface.co/{repo})" if repo else f"{_cell(ref)} (local)"


def _cell(text: str) -> str:
    """Text that cannot break a Markdown table row."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "&#124;")


def _prompts(prompts: Sequence[str]) -> str:
    if not prompts:
        return "-"
    cut = [p if len(p) <= _MAX_PROMPT else p[:_MAX_PROMPT] + "…" for p in prompts]
    return "<br>".join(_cell(p) for p in cut)


def _fenced(text: str, lang: str) -> str:
    runs = [len(m) for m in re.findall(r"`{3,}", text)]
    fence = "`" * max([3] + [n + 1 for n in runs])
    return f"{fence}{lang}\n{text}\n{fence}"


def _count(n: int) -> str:
    return f"{human_count(n)} ({n:,})"
