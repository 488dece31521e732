"""A build's inputs, opened and checked from configs and safetensors headers before any weight is read."""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from typing import TYPE_CHECKING, Dict, List, Tuple

from moeforge.config import Expert, MoEConfig
from moeforge.errors import ConfigError, SourceError
from moeforge.files import TOKENIZER_FILES
from moeforge.gate_modes import GATE_MODES
from moeforge.options import BuildOptions
from moeforge.sources.checkpoint import CODE_OF, Checkpoint

if TYPE_CHECKING:
    from moeforge.families import Family
    from moeforge.layouts import Layout

log = logging.getLogger("moeforge")


@dataclasses.dataclass
class Inputs:
    """Everything known about a build before any tensor data is read."""

    config: MoEConfig
    options: BuildOptions
    base: Checkpoint
    experts: List[Tuple[Expert, Checkpoint]]
    shared: List[Tuple[Expert, Checkpoint]]
    family: "Family"  # the base's: it decides every non-MLP tensor
    layout: "Layout"
    layout_inferred: bool
    num_layers: int
    hidden_size: int
    out_dtype: str  # safetensors code
    seed: int
    checkpoints: Dict[str, Checkpoint]

    def recipe(self) -> dict:
        return self.config.model_dump(mode="json")

    @property
    def layout_name(self) -> str:
        return self.layout.name

    @property
    def family_name(self) -> str:
        return self.family.name

    def family_of(self, ckpt: Checkpoint) -> "Family":
        from moeforge.families import family_of

        return family_of(ckpt)

    @property
    def granularity(self) -> int:
        return self.config.upcycle.granularity if self.config.upcycle else 1

    @property
    def experts_per_token(self) -> int:
        return self.config.experts_per_token * self.granularity

    def expert_extras(self, index: int, layer: int, role: str, intermediate: int) -> dict:
        """Upcycling's per-tensor transforms for routed expert `index`; none for a plain build."""
        if self.config.upcycle is None:
            return {}
        from moeforge.plan.upcycle import expert_extras

        return expert_extras(self, index, layer, role, intermediate)

    @property
    def gated(self) -> List[Tuple[Expert, Checkpoint]]:
        """Experts that get a router row: the routed ones, then a gated shared expert (several shared experts
        are one MLP under one gate, whose row comes from all their prompts together)."""
        if not (self.layout.shared_router and self.shared):
            return self.experts
        if len(self.shared) == 1:
            return self.experts + self.shared
        joined = Expert.model_construct(
            source_model=" + ".join(e.label for e, _ in self.shared),
            positive_prompts=[p for e, _ in self.shared for p in e.positive_prompts or []],
            negative_prompts=[p for e, _ in self.shared for p in e.negative_prompts or []] or None,
        )
        return self.experts + [(joined, self.shared[0][1])]

    @property
    def base_params(self) -> int:
        return sum(math.prod(ref.shape) for name, ref in self.base.tensors.items() if not self.family.is_skipped(name))

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


def open_inputs(config: MoEConfig, opts: BuildOptions) -> Inputs:
    """Resolve and check every source and choose the layout, reading only configs and safetensors headers:
    every refusal comes before any weight is downloaded, and each source is opened only once the ones before
    it passed. Hub weights are downloaded at the end (`materialize`)."""
    from moeforge.checks.sources import check_base_tensors, check_expert_vocab
    from moeforge.families import family_of, open_dense
    from moeforge.layouts import select_layout

    if config.upcycle is None:
        _check_not_all_same(config, opts)
    checkpoints: Dict[str, Checkpoint] = {}

    def open_once(ref: str) -> Checkpoint:
        if ref not in checkpoints:
            checkpoints[ref] = open_dense(ref)
        return checkpoints[ref]

    try:
        base = open_once(config.base_model)
        family = family_of(base)
        layout, inferred = select_layout(config.architecture, family.name, family.features(base),
                                         config.shared_experts or [], config.gate_mode, config.renormalize)
        num_layers, hidden = _base_dims(base)
        if config.upcycle is not None:
            from moeforge.plan.upcycle import check_granularity

            check_granularity(base.ref(family.mlp_name("gate", 0)).shape[0], config.upcycle.granularity)
        for where, expert in _all_experts(config):
            _check_layer_ranges(where, expert, num_layers)
        checked = ExpertChecks((family.name,), f"the base is {family.name}", "the base model's", layout,
                               num_layers, hidden, opts)
        experts = [(e, checked(e, _open_expert(e, open_once), False)) for e in config.experts]
        shared = [(e, checked(e, _open_expert(e, open_once), True)) for e in config.shared_experts or []]
        check_base_tensors(base, family, num_layers, hidden)
        check_expert_vocab(base, experts + shared)
        for ckpt in checkpoints.values():
            ckpt.materialize()
    except BaseException:
        for ckpt in checkpoints.values():
            ckpt.close()
        raise
    seed = opts.random_seed if opts.random_seed is not None else secrets.randbelow(2**31)
    inputs = Inputs(config, opts, base, experts, shared, family, layout, inferred, num_layers, hidden,
                    _output_dtype(config, base), seed, checkpoints)
    _check_gate_sources(inputs)
    return inputs


def _check_gate_sources(inputs: Inputs) -> None:
    """What the gate mode will read, checked now: a routers' failure would otherwise come after the checks."""
    mode = GATE_MODES[inputs.config.gate_mode]
    if not mode.needs_prompts:
        return
    base = inputs.base
    if not any((base.path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{base.label}: has no tokenizer files, which gate_mode {mode.name} needs to read the prompts")
    if mode.reads_embeddings:
        from moeforge.gates import GateInputs

        base.ref(GateInputs.embed_name)


def _all_experts(config: MoEConfig):
    yield from ((f"experts.{i}", e) for i, e in enumerate(config.experts))
    yield from ((f"shared_experts.{i}", e) for i, e in enumerate(config.shared_experts or []))


def _open_expert(expert: Expert, open_once):
    """The expert's checkpoint, or a LayeredSource over its per-layer sources."""
    from moeforge.sources.layered import LayeredSource

    if expert.sources is None:
        return open_once(expert.source_model)
    return LayeredSource(expert.label, [(s.layers, open_once(str(s.model))) for s in expert.sources])


def _check_layer_ranges(where: str, expert: Expert, num_layers: int) -> None:
    if expert.sources is not None and expert.sources[-1].layers[1] != num_layers:
        end = expert.sources[-1].layers[1]
        raise ConfigError(f"{where}.sources: layer ranges end at {end}, but the base model has {num_layers} layers"
                          " (ranges must cover [0, num_layers) exactly)")


def _check_not_all_same(config: MoEConfig, opts: BuildOptions) -> None:
    sources = {e.label for e in config.experts}
    if len(config.experts) > 1 and len(sources) == 1 and not opts.allow_all_same:
        if GATE_MODES[config.gate_mode].random:  # as mergekit-moe: random gates mean upcycling
            log.warning("experts: every expert is the same model: this is sparse upcycling, which needs training "
                        "(until then it computes what the dense model does, at a higher cost)")
            return
        raise ConfigError(
            f"experts: every expert is the same model, which costs more and computes the same (gate_mode "
            f"{config.gate_mode}); if you will train it afterwards, pass "
            "--i-understand-this-is-not-useful-without-training, or use gate_mode random or uniform_random"
        )


def _base_dims(base: Checkpoint) -> Tuple[int, int]:
    hidden = base.config_value("hidden_size")
    num_layers = base.config_value("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(num_layers, int):
        raise SourceError(f"{base.path / 'config.json'}: needs integer hidden_size and num_hidden_layers")
    return num_layers, hidden


class ExpertChecks:
    """Every expert must fit the base: family (unless --allow-crimes), hidden size, depth, and MLP tensors
    present and consistent; routed experts (and shared ones, where the layout gives them the routed width) share
    one intermediate size."""

    def __init__(self, families: Tuple[str, ...], family_rule: str, whose: str, layout, num_layers: int, hidden: int,
                 opts: BuildOptions, routed_inter=None):
        self.families, self.family_rule, self.whose, self.layout, self.opts = families, family_rule, whose, layout, opts
        self.num_layers, self.hidden, self.routed_inter = num_layers, hidden, routed_inter

    def __call__(self, expert: Expert, ckpt, is_shared: bool):
        from moeforge.families import family_of

        parts = getattr(ckpt, "parts", None) or [((0, self.num_layers), ckpt)]
        for _, part in parts:
            other = family_of(part)
            if other.name not in self.families and not self.opts.allow_crimes:
                raise SourceError(
                    f"{part.label}: is a {other.name} model but {self.family_rule}; mixing families needs --allow-crimes"
                )
            for key, want in (("hidden_size", self.hidden), ("num_hidden_layers", self.num_layers)):
                got = part.config_value(key)
                if got != want:
                    raise SourceError(f"{part.label}: {key} is {got}, but {self.whose} is {want}")
        mlp = family_of(ckpt).mlp_name
        inter = ckpt.ref(mlp("gate", 0)).shape[0]
        for layer in range(self.num_layers):
            shapes = {r: ckpt.ref(mlp(r, layer)).shape for r in ("gate", "up", "down")}
            want = {"gate": (inter, self.hidden), "up": (inter, self.hidden), "down": (self.hidden, inter)}
            if shapes != want:
                raise SourceError(
                    f"{expert.label}: layer {layer} MLP shapes {shapes} do not match {want} "
                    f"(hidden size {self.hidden}, intermediate size {inter})"
                )
        if self.routed_inter is None:
            self.routed_inter = inter
        elif inter != self.routed_inter and (not is_shared or self.layout.shared_width_is_routed):
            kind = "shared expert" if is_shared else "expert"
            raise SourceError(
                f"{expert.label}: {kind} intermediate size {inter} differs from the routed experts' "
                f"{self.routed_inter} ({self.layout.name} needs them equal)"
            )
        return ckpt


def _output_dtype(config: MoEConfig, base: Checkpoint) -> str:
    name = config.dtype or base.config_value("torch_dtype") or base.config_value("dtype")
    if isinstance(name, str) and name in CODE_OF and CODE_OF[name] in ("F32", "F16", "BF16"):
        return CODE_OF[name]
    return base.ref(next(iter(base.tensors))).dtype
