"""Editing existing MoE checkpoints: `moeforge add-expert` and `moeforge extract`.

Both read the MoE through its layout's name templates (sources/moe_checkpoint.py), plan every output tensor
with the same plan pieces as `build`, and write through the same streaming writer into a temporary directory
that replaces the output only when complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from moeforge._version import __version__
from moeforge.config import RANDOM_GATE_MODES, Expert, MoEConfig, describe_validation_error
from moeforge.errors import ConfigError, SourceError
from moeforge.options import BuildOptions, parse_shard_size
from moeforge.sources.checkpoint import DTYPES

log = logging.getLogger("moeforge")

# Files of an MoE directory that an edit rewrites; everything else at its top level is copied as it is.
_REWRITTEN = ("config.json", "model.safetensors.index.json")
# dense model_type -> (config class, model class) in transformers
_DENSE = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


@dataclasses.dataclass
class EditResult:
    out_dir: Path
    files: List[str]
    summary: str


def extract_expert(moe_dir, expert: int, out_dir, **options) -> EditResult:
    """The dense model (Llama/Mistral/Qwen2/Qwen3, the MoE's attention) whose MLP is routed expert `expert`."""
    from moeforge.files import RESOLVED_CONFIG
    from moeforge.pipeline.build import write_checkpoint
    from moeforge.plan.moe import source_tensor, sort_key
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

        def side_files(tmp: Path) -> None:
            config = _dense_config(moe, model_type)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _copy_other_files(moe.path, tmp, skip=(RESOLVED_CONFIG,))

        shard_bytes = parse_shard_size(opts.out_shard_size, DTYPES[tensors[0].dtype][1])
        written = write_checkpoint(out_dir, tensors, shard_bytes, opts, side_files)
    finally:
        moe.close()
    result = EditResult(out_dir, written.files,
                        f"wrote {out_dir}: expert {expert} of {moe.path} as a dense {model_type} model")
    log.info(result.summary)
    return result


def _dense_config(moe, model_type: str) -> dict:
    """The MoE's config without its MoE keys, as the dense class of `model_type` reads it."""
    import transformers

    config_class, model_class = _DENSE[model_type]
    cls = getattr(transformers, config_class)
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}  # legacy spellings the class still reads
    keys = {k: v for k, v in moe.ckpt.config.items() if k in known and k not in (
        "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    keys["intermediate_size"] = moe.intermediate_size
    config = cls(**keys)
    config.architectures = [model_class]
    config.dtype = moe.ckpt.config_value("dtype") or moe.ckpt.config_value("torch_dtype")
    return config.to_dict()


def _copy_other_files(src: Path, dst: Path, skip: Sequence[str] = ()) -> None:
    """Tokenizer, generation config, model card...: every top-level file an edit does not rewrite."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in _REWRITTEN + tuple(skip):
            shutil.copyfile(path, dst / path.name)


def add_expert(moe_dir, expert_model: str, prompts: Sequence[str] = (), negative_prompts: Sequence[str] = (),
               out_dir=None, gate_mode: Optional[str] = None, base_model: Optional[str] = None,
               **options) -> EditResult:
    """Append a routed expert (the MLPs of `expert_model`) with its router row to an MoE checkpoint; in
    place when `out_dir` is None. Every check runs before the expert's weights are downloaded."""
    from moeforge.files import RESOLVED_CONFIG
    from moeforge.pipeline.build import write_checkpoint
    from moeforge.pipeline.inputs import ExpertChecks
    from moeforge.families import family_of, open_dense
    from moeforge.gates import GateInputs, compute_gates
    from moeforge.plan.moe import source_tensor, sort_key
    from moeforge.plan.tensors import FromValue, PlannedTensor
    from moeforge.sources.moe_checkpoint import MoECheckpoint
    from moeforge.writer.output_dir import check_output_path

    import torch

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
        base = None
        if mode not in RANDOM_GATE_MODES and mode != "cheap_embed":
            base = _open_base(moe, base_model or (saved.base_model if saved else None), opened)
        ckpt = open_dense(expert.source_model)
        opened.append(ckpt)
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
        tensors = []
        for name, ref in moe.ckpt.tensors.items():
            if name in {moe.layout.router_name(l) for l in range(moe.num_layers)}:
                continue
            tensors.append(source_tensor(name, moe.ckpt, name, ref.dtype, seed))
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
        tensors.sort(key=lambda t: sort_key(t.name))

        def side_files(tmp: Path) -> None:
            dtype = moe.ckpt.config_value("dtype") or moe.ckpt.config_value("torch_dtype")
            moe_config = moe.layout.model_config(moe.ckpt.config, dataclasses.replace(moe.shape, num_experts=index + 1),
                                                 dtype)
            (tmp / "config.json").write_text(json.dumps(moe_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _copy_other_files(moe.path, tmp, skip=(RESOLVED_CONFIG,))
            if config is not None:
                (tmp / RESOLVED_CONFIG).write_text(
                    f"# moeforge {__version__}; expert {index} ({expert.label}) added by moeforge add-expert "
                    f"(gate_mode {mode}, seed {seed})\n" + config.to_yaml(), encoding="utf-8")
            else:
                log.warning("%s: has no %s, so the added expert is recorded only in config.json", moe.path,
                            RESOLVED_CONFIG)

        shard_bytes = parse_shard_size(opts.out_shard_size, DTYPES[tensors[0].dtype][1])
        written = write_checkpoint(out, tensors, shard_bytes, opts, side_files)
    finally:
        for c in opened:
            c.close()
        moe.close()
    result = EditResult(out, written.files, f"wrote {out}: {moe.layout.name} layout, expert {index} added "
                        f"({expert.label}), {index + 1} experts")
    log.info(result.summary)
    return result


def _new_expert(model: str, prompts, negative_prompts, mode: str) -> Expert:
    from pydantic import ValidationError

    if mode not in RANDOM_GATE_MODES and not prompts:
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
