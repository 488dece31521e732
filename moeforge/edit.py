"""Editing existing MoE checkpoints: `moeforge add-expert` and `moeforge extract`.

Both read the MoE through its layout (sources/moe_checkpoint.py), plan every output tensor with the same plan
pieces as `build`, and write through the same session, side-file writers and manifest as `build`
(pipeline/output.py), so an edited output verifies like a built one.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from moeforge._version import __version__
from moeforge.config import Expert, MoEConfig, describe_validation_error
from moeforge.errors import ConfigError, SourceError
from moeforge.files import CARD, INDEX, MANIFEST, MODEL_CONFIG, RESOLVED_CONFIG
from moeforge.gate_modes import GATE_MODES
from moeforge.options import BuildOptions, parse_shard_size
from moeforge.sources.checkpoint import DTYPES

log = logging.getLogger("moeforge")

@dataclasses.dataclass
class EditResult:
    out_dir: Path
    files: List[str]
    summary: str


@dataclasses.dataclass
class EditJob:
    """What the session records for an edit (writer.resume.Job): the models read and what was done to them."""

    options: BuildOptions
    seed: int
    checkpoints: Dict[str, object]
    base: object  # the MoE: its tokenizer and generation config are copied
    layout_name: str
    family_name: str
    edit: dict

    def recipe(self) -> dict:
        return self.edit


def _write(out: Path, job: EditJob, plan, side_files) -> List[str]:
    from moeforge.pipeline.output import write_checkpoint
    from moeforge.pipeline.side_files import copied_names
    from moeforge.writer.resume import BuildSession

    max_shard = parse_shard_size(job.options.out_shard_size, DTYPES[plan.tensors[0].dtype][1])
    session = BuildSession.open(out, job)
    return write_checkpoint(session, plan, max_shard, side_files, job.base.path,
                            copied_names(job.options.copy_tokenizer)).files


def extract_expert(moe_dir, expert: int, out_dir, **options) -> EditResult:
    """The dense model (the layout's dense twin: the MoE's attention) whose MLP is routed expert `expert`."""
    from moeforge.card import dense_card, license_of
    from moeforge.families import family_for_model_type
    from moeforge.layouts import MoEShape
    from moeforge.pipeline import side_files as side
    from moeforge.plan.moe import MoEPlan, sort_key, source_tensor
    from moeforge.sources.moe_checkpoint import MoECheckpoint
    from moeforge.writer.output_dir import check_output_path

    opts = BuildOptions.from_kwargs(**options)
    out_dir = Path(out_dir)
    check_output_path(out_dir, opts.overwrite)
    moe = MoECheckpoint(Path(moe_dir))
    try:
        if not 0 <= expert < moe.num_experts:
            raise ConfigError(f"--expert: {expert} is not an expert of {moe.path} (it has {moe.num_experts}, "
                              f"numbered 0..{moe.num_experts - 1})")
        ckpt = moe.ckpt
        tensors = [source_tensor(n, ckpt, n, ckpt.ref(n).dtype, 0) for n in ckpt.tensors if not moe.is_moe_tensor(n)]
        for layer in range(moe.num_layers):
            for role in ("gate", "up", "down"):
                name = moe.expert_tensor(role, layer, expert)
                tensors.append(source_tensor(f"model.layers.{layer}.mlp.{role}_proj.weight", ckpt, name,
                                             ckpt.ref(name).dtype, 0))
        tensors.sort(key=lambda t: sort_key(t.name))
        model_type = moe.dense_model_type()
        config = _dense_config(moe, model_type)
        plan = MoEPlan(tensors, MoEShape(0, 0, moe.intermediate_size), moe.num_layers)
        job = EditJob(opts, 0, {str(moe.path): ckpt}, ckpt, model_type, family_for_model_type(model_type).name,
                      {"extract": {"from": str(moe.path), "expert": expert}})

        def side_files(tmp: Path) -> None:
            side.write_model_config(tmp, config)
            side.copy_tokenizer_files(moe.path, tmp, str(moe.path), opts.copy_tokenizer)
            side.write_card(tmp, dense_card(str(moe.path), expert, model_type, plan.total_params, license_of(moe.path)))

        files = _write(out_dir, job, plan, side_files)
    finally:
        moe.close()
    result = EditResult(out_dir, files, f"wrote {out_dir}: expert {expert} of {moe.path} as a dense {model_type} model")
    log.info(result.summary)
    return result


def _dense_config(moe, model_type: str) -> dict:
    """The MoE's config without its MoE keys, as transformers' dense class of `model_type` reads it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moeforge.layouts.base import rope_keys

    cls = transformers.CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}  # legacy spellings the class still reads
    keys = {k: v for k, v in moe.ckpt.config.items() if k in known and k not in (
        "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    keys["intermediate_size"] = moe.intermediate_size
    config = cls(**keys)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    config.dtype = moe.ckpt.config_value("dtype") or moe.ckpt.config_value("torch_dtype")
    keys = config.to_dict()
    return {**keys, **rope_keys(keys)}  # RoPE as transformers 4.x and 5.x read it


def _copy_other_files(src: Path, dst: Path, layout) -> None:
    """Files of the MoE that an edit neither rewrites nor regenerates (user additions, say), copied as they are."""
    import shutil

    from moeforge.pipeline.side_files import copied_names

    regenerated = {MODEL_CONFIG, INDEX, MANIFEST, CARD, RESOLVED_CONFIG, *copied_names(True), *layout.extra_files()}
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in regenerated \
                and not path.name.startswith("."):
            shutil.copyfile(path, dst / path.name)


def add_expert(moe_dir, expert_model: str, prompts: Sequence[str] = (), negative_prompts: Sequence[str] = (),
               out_dir=None, gate_mode: Optional[str] = None, base_model: Optional[str] = None,
               **options) -> EditResult:
    """Append a routed expert (the MLPs of `expert_model`) with its router row to an MoE checkpoint; in
    place when `out_dir` is None. Every check runs before the expert's weights are downloaded."""
    import torch

    from moeforge.families import family_of, open_dense
    from moeforge.gates import GateInputs, compute_gates
    from moeforge.pipeline import side_files as side
    from moeforge.pipeline.inputs import ExpertChecks
    from moeforge.plan.moe import MoEPlan, sort_key, source_tensor
    from moeforge.plan.packing import pack
    from moeforge.plan.tensors import FromValue, PlannedTensor
    from moeforge.sources.moe_checkpoint import MoECheckpoint
    from moeforge.writer.manifest import read_manifest
    from moeforge.writer.output_dir import check_output_path

    opts = BuildOptions.from_kwargs(**options)
    moe_dir = Path(moe_dir)
    out = Path(out_dir) if out_dir is not None else moe_dir
    if out_dir is not None:
        check_output_path(out, opts.overwrite)
    else:
        opts = dataclasses.replace(opts, overwrite=True)  # in place: the new directory replaces MOE_DIR
    moe = MoECheckpoint(moe_dir)
    opened = []
    try:
        saved_path = moe.saved_config_path()
        saved = MoEConfig.from_yaml(saved_path) if saved_path else None
        mode = gate_mode or (saved.gate_mode if saved else None)
        if mode is None:
            raise ConfigError(f"{moe.path}: has no {RESOLVED_CONFIG} recording the gate mode; pass --gate-mode")
        expert = _new_expert(expert_model, prompts, negative_prompts, mode)
        config = None
        if saved is not None:
            if mode != saved.gate_mode:
                log.warning("--gate-mode %s differs from the recorded %s: the recorded recipe will not rebuild the "
                            "new expert's router row", mode, saved.gate_mode)
            data = saved.model_dump(exclude_none=True)
            data["experts"].append(expert.model_dump(exclude_none=True))
            config = MoEConfig.from_dict(data, origin=f"{saved_path} with the new expert")
        checkpoints = {str(moe.path): moe.ckpt}
        base = None
        if GATE_MODES[mode].runs_base_model:
            base = _open_base(moe, base_model or (saved.base_model if saved else None), opened)
            checkpoints[base_model or saved.base_model] = base
        ckpt = open_dense(expert.source_model)
        opened.append(ckpt)
        checkpoints.setdefault(expert.source_model, ckpt)
        checks = ExpertChecks(moe.layout.families, f"{moe.path} takes {'/'.join(moe.layout.families)} experts",
                              "the MoE's", moe.layout, moe.num_layers, moe.hidden_size, opts,
                              routed_inter=moe.intermediate_size)
        checks(expert, ckpt, False)
        for c in opened:
            c.materialize()

        seed = opts.random_seed if opts.random_seed is not None else secrets.randbelow(2**31)
        gate_inputs = GateInputs(base if base is not None else moe.ckpt, [expert], moe.num_layers, moe.hidden_size,
                                 seed, opts)
        rows = compute_gates(mode, gate_inputs)[:, 0]  # (layers, hidden)
        index = moe.num_experts
        routers = {moe.layout.router_name(l) for l in range(moe.num_layers)}
        routed = {moe.expert_tensor(r, l, e) for l in range(moe.num_layers) for e in range(index) for r in ("gate", "up", "down")}
        tensors = [source_tensor(name, moe.ckpt, name, ref.dtype, seed, routed=name in routed)
                   for name, ref in moe.ckpt.tensors.items() if name not in routers]
        mlp = family_of(ckpt).mlp_name
        for layer in range(moe.num_layers):
            router = moe.ckpt.load(moe.layout.router_name(layer))
            value = torch.cat([router, rows[layer:layer + 1].to(router.dtype)]).contiguous()
            tensors.append(PlannedTensor(moe.layout.router_name(layer), tuple(value.shape),
                                         moe.ckpt.ref(moe.layout.router_name(layer)).dtype, FromValue(value)))
            for role in ("gate", "up", "down"):
                out_dtype = moe.ckpt.ref(moe.expert_tensor(role, layer, 0)).dtype
                tensors.append(source_tensor(moe.expert_tensor(role, layer, index), ckpt, mlp(role, layer),
                                             out_dtype, seed, expert, role, routed=True))
        tensors = pack(moe.layout, tensors, moe.num_layers, index + 1)
        tensors.sort(key=lambda t: sort_key(t.name))
        shape = dataclasses.replace(moe.shape, num_experts=index + 1)
        plan = MoEPlan(tensors, shape, moe.num_layers)
        dtype = moe.ckpt.config_value("dtype") or moe.ckpt.config_value("torch_dtype")
        moe_config = moe.layout.model_config(moe.ckpt.config, shape, dtype)
        header = (f"moeforge {__version__}; expert {index} ({expert.label}) added by moeforge add-expert "
                  f"(gate_mode {mode}, seed {seed})")
        manifest = _old_manifest(moe.path, read_manifest)
        job = EditJob(opts, seed, checkpoints, moe.ckpt, moe.layout.name,
                      manifest.get("family") or moe.layout.families[0],
                      {"add_expert": expert.model_dump(mode="json"), "to": str(moe.path), "gate_mode": mode})

        def side_files(tmp: Path) -> None:
            side.write_model_config(tmp, moe_config)
            side.copy_tokenizer_files(moe.path, tmp, str(moe.path), opts.copy_tokenizer)
            side.write_layout_files(tmp, moe.layout)
            _copy_other_files(moe.path, tmp, moe.layout)
            if config is not None:
                side.write_recipe(tmp, config, header)
            else:
                log.warning("%s: has no %s, so the added expert is recorded only in config.json and the card",
                            moe.path, RESOLVED_CONFIG)
            side.write_card(tmp, _added_card(moe, config, expert, ckpt, mode, plan, header))

        files = _write(out, job, plan, side_files)
    finally:
        for c in opened:
            c.close()
        moe.close()
    result = EditResult(out, files, f"wrote {out}: {moe.layout.name} layout, expert {index} added "
                        f"({expert.label}), {index + 1} experts")
    log.info(result.summary)
    return result


def _old_manifest(path: Path, read_manifest) -> dict:
    try:
        return read_manifest(path) or {}
    except ValueError:
        return {}


def _added_card(moe, config: Optional[MoEConfig], expert: Expert, ckpt, mode: str, plan, header: str):
    """The MoE's card with the new expert: from the recorded recipe when there is one. The MoE's own license
    stands for the sources it was built from (their files need not be here)."""
    from moeforge.card import (
        CardExpert,
        CardSource,
        license_of,
        make_card,
        recipe_card,
        source_info,
    )

    moe_license = license_of(moe.path)
    top_k = plan.shape.experts_per_token
    new = source_info(expert.source_model, ckpt.path)
    if config is not None:
        refs = {config.base_model} | {m for e in config.experts + list(config.shared_experts or []) for m in e.models()}
        sources = [new if r == new.ref else CardSource(r, moe_license) for r in sorted(refs)]
        text = f"# {header}\n" + config.to_yaml()
        return recipe_card(config, sources, moe.layout.name, plan, text, top_k,
                           runtimes=moe.layout.runtime_report(plan.shape))
    experts = [CardExpert(f"{moe.path} expert {i}") for i in range(moe.num_experts)]
    experts.append(CardExpert(expert.label, expert.positive_prompts or (), expert.negative_prompts or ()))
    return make_card(base_model=str(moe.path), experts=experts, sources=[CardSource(str(moe.path), moe_license), new],
                     layout=moe.layout.name, total_params=plan.total_params, active_params=plan.active_params,
                     config_text=f"# {header}; {moe.path} records no {RESOLVED_CONFIG}", gate_mode=mode,
                     experts_per_token=top_k)


def _new_expert(model: str, prompts, negative_prompts, mode: str) -> Expert:
    from pydantic import ValidationError

    if GATE_MODES[mode].needs_prompts and not prompts:
        raise ConfigError(f"--prompt: required with gate_mode '{mode}' (or pass --gate-mode random)")
    try:
        return Expert(source_model=model, positive_prompts=list(prompts) or None,
                      negative_prompts=list(negative_prompts) or None)
    except ValidationError as e:
        raise ConfigError(f"--expert: {describe_validation_error(e)}") from None


def _open_base(moe, base_model: Optional[str], opened: list):
    """The dense base whose hidden states give router rows: the one the MoE was built from."""
    from moeforge.families import open_dense

    if base_model is None:
        raise ConfigError(f"{moe.path}: hidden gates need the base model the MoE was built from, and no "
                          "moeforge_config.yml records it; pass --base-model")
    try:
        base = open_dense(base_model)
    except SourceError as e:
        raise SourceError(f"base model for hidden gates is not available ({e}); pass --base-model") from None
    opened.append(base)
    for key, want in (("hidden_size", moe.hidden_size), ("num_hidden_layers", moe.num_layers)):
        if base.config_value(key) != want:
            raise SourceError(f"{base.label}: {key} is {base.config_value(key)}, but the MoE's is {want}: "
                              "not the base it was built from; pass --base-model")
    return base
