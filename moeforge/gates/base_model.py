"""The base model's forward pass over the prompts: loaded once per build, batched, freed before writing.

Two readings of it:
- `prompt_states`: the residual stream entering each layer, per prompt (the `hidden*` gate modes);
- `router_inputs`: every real token's MLP input, the tensor an MoE router sees (the `fitted` gate mode).
`expert_mlps` swaps an expert's MLP weights into the loaded model for a while: the base's attention with
that expert's MLPs is what the MoE computes for a token routed to that expert.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import warnings
from typing import Iterator, List, Optional

from moeforge.errors import SourceError
from moeforge.gates.prompts import load_tokenizer, pad_id, tokenize

log = logging.getLogger("moeforge")


@dataclasses.dataclass
class RouterInputs:
    """Per layer, one row per real prompt token (padding and the prepended bos excluded)."""

    layers: List["object"]  # torch.Tensor (tokens, hidden), in the forward pass's dtype, on the CPU
    prompt_of_token: "object"  # torch.Tensor (tokens,): index into the prompt list


def _base_config(raw: dict):
    """The base's config with its RoPE also in the legacy spelling when it has only transformers 5's
    `rope_parameters`, so transformers 4.x computes the same hidden states (and gates) as 5.x. None (the
    checkpoint's own config) for model types the installed transformers does not know."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeforge.layouts.base import rope_keys

    keys = dict(raw)
    model_type = keys.pop("model_type", None)
    if model_type not in CONFIG_MAPPING or "rope_parameters" not in keys or "rope_theta" in keys:
        return None
    return AutoConfig.for_model(model_type, **keys, **rope_keys(keys, parameters=False))


class BaseModel:
    def __init__(self, inputs):
        self.inputs = inputs
        self.model = None

    def __enter__(self) -> "BaseModel":
        from transformers import AutoModelForCausalLM

        from moeforge.gates.loading import load_kwargs

        self.tok = load_tokenizer(self.inputs)
        kwargs = load_kwargs(self.inputs.options)
        log.debug("loading %s for its hidden states with %s", self.inputs.base.label, kwargs)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(self.inputs.base.path),
                                                              config=_base_config(self.inputs.base.config), **kwargs)
        except (OSError, ValueError, ImportError) as e:  # missing files, unsupported quantization, no accelerate
            raise SourceError(f"{self.inputs.base.label}: cannot load it for the forward pass "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def mlp_parameters(self):
        """{checkpoint tensor name: model parameter} of every MLP weight, or None where they cannot be swapped
        (quantized, offloaded to disk, or named otherwise than the checkpoint)."""
        from moeforge.families import family_of
        from moeforge.families.base import MLP_ROLES

        family = family_of(self.inputs.base)
        params = {}
        for layer in range(self.inputs.num_layers):
            for role in MLP_ROLES:
                name = family.mlp_name(role, layer)
                try:
                    param = self.model.get_parameter(name)
                except AttributeError:
                    return None
                if not param.dtype.is_floating_point or param.device.type == "meta":
                    return None
                params[(role, layer)] = (name, param)
        return params

    @contextlib.contextmanager
    def expert_mlps(self, checkpoint, expert, params):
        """The model with `checkpoint`'s MLP weights (down_proj times the expert's residual_scale); the base's
        are read back from its checkpoint afterwards."""
        import torch

        from moeforge.families import family_of

        mlp_name = family_of(checkpoint).mlp_name
        try:
            with torch.no_grad():
                for (role, layer), (_, param) in params.items():
                    name = mlp_name(role, layer)
                    weight = checkpoint.load(name)
                    delta = checkpoint.delta_for(name)
                    if delta is not None:  # a LoRA expert: its merged weights, as the build writes them
                        weight = weight.float() + delta.compute()
                    if role == "down" and expert.residual_scale is not None:
                        weight = weight.float() * expert.residual_scale
                    param.copy_(weight.to(param.dtype))
            yield self
        finally:
            with torch.no_grad():
                for name, param in params.values():
                    param.copy_(self.inputs.base.load(name).to(param.dtype))

    def prompt_states(self, prompts: List[str], average: bool) -> List["object"]:
        """(layers, hidden) float32 per prompt: the residual stream entering each layer at the prompt's last real
        token, or averaged over its real tokens; None for a prompt without tokens."""
        import torch

        n_layers = self.inputs.num_layers
        result: List[Optional[torch.Tensor]] = [None] * len(prompts)
        for indices, mask, out, _ in self._batches(prompts, output_hidden_states=True):
            states = torch.stack([h.float().cpu() for h in out.hidden_states[:n_layers]], dim=1)  # (b, L, t, h)
            for row, index in enumerate(indices):
                real = states[row, :, : int(mask[row].sum())]
                result[index] = real.mean(1) if average else real[:, -1]
        return result

    def router_inputs(self, prompts: List[str]) -> RouterInputs:
        import torch

        per_layer: List[List[torch.Tensor]] = [[] for _ in range(self.inputs.num_layers)]
        owners = []
        skip_first = self.tok.bos_token is not None  # the prepended bos looks the same in every prompt
        for indices, mask, _, captured in self._batches(prompts, capture_mlp_inputs=True):
            keep = mask.bool()
            if skip_first:
                keep[:, 0] = False
            owners.append(torch.tensor(indices).repeat_interleave(keep.sum(1)))
            for layer, h in enumerate(captured):
                per_layer[layer].append(h[keep.to(h.device)].cpu())
        return RouterInputs([torch.cat(chunks) for chunks in per_layer], torch.cat(owners))

    def _batches(self, prompts: List[str], output_hidden_states: bool = False, capture_mlp_inputs: bool = False
                 ) -> Iterator:
        """(prompt indices, attention mask, model output, captured MLP inputs per layer) per batch, longest first."""
        import torch
        from tqdm.auto import tqdm

        embedding = self.model.get_input_embeddings()
        rows, device = embedding.weight.shape[0], embedding.weight.device
        ids = tokenize(self.tok, prompts, rows, getattr(self.model.config, "max_position_embeddings", None))
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
        if len(order) < len(ids):  # only without a bos token: nothing to run, nothing to average
            if not order:
                raise SourceError(f"{self.inputs.base.label}: no prompt has a token (all are empty, and the "
                                  "tokenizer has no bos token to stand for an empty prompt)")
            log.warning("%d empty prompt(s) ignored: the tokenizer has no bos token to stand for them",
                        len(ids) - len(order))
        step = max(1, self.inputs.options.prompt_batch_size)
        pad = pad_id(self.tok, rows)
        captured: List = []
        hooks = _mlp_input_hooks(self.model, self.inputs.num_layers, captured) if capture_mlp_inputs else []
        try:
            for start in tqdm(range(0, len(order), step), desc="running the base model", unit="batch",
                              disable=self.inputs.options.quiet or len(order) <= step):
                indices = order[start:start + step]
                width = len(ids[indices[0]])
                input_ids = torch.full((len(indices), width), pad, dtype=torch.long)
                mask = torch.zeros((len(indices), width), dtype=torch.long)
                for row, i in enumerate(indices):  # right padding: real tokens never attend to pads
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                captured.clear()
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # bitsandbytes' per-call dtype notices
                    out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     output_hidden_states=output_hidden_states, use_cache=False)
                yield indices, mask, out, list(captured)
        finally:
            for hook in hooks:
                hook.remove()


def decoder_layers(model, num_layers: int):
    """The model's stack of decoder layers: the first ModuleList as long as the config's layer count."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise SourceError(f"cannot find the {num_layers} decoder layers in {type(model).__name__}")


def _mlp_input_hooks(model, num_layers: int, captured: list):
    """Record, per layer in order, the input of the MLP block (after post_attention_layernorm)."""

    def record(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    def record_output(module, args, output):
        captured.append(output)

    hooks = []
    for i, layer in enumerate(decoder_layers(model, num_layers)):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if mlp is not None:
            hooks.append(mlp.register_forward_pre_hook(record, with_kwargs=True))
        elif getattr(layer, "post_attention_layernorm", None) is not None:
            hooks.append(layer.post_attention_layernorm.register_forward_hook(record_output))
        else:
            for h in hooks:
                h.remove()
            raise SourceError(f"layer {i} of {type(model).__name__} has neither an mlp nor a post_attention_layernorm")
    return hooks
