"""gate_mode `fitted`: per layer, a router fitted to the tokens of the prompts, as the MoE will see them.

A forward hook keeps each real token's MLP input (the output of post_attention_layernorm), which is exactly
what the router of that layer multiplies. An expert's positive prompts run through the base model with that
expert's MLPs swapped in (when the experts' checkpoints are given and the model is not quantized): at layer
l, that is the state the MoE itself is in for a token routed to that expert in layers 0..l-1, which is what
the router must recognise. Everything else (negative prompts, shared experts, the duplicate check) runs
through the base as it is. Each token is labelled with the expert whose positive prompts it came from;
tokens of an expert's negative prompts are labelled as "not this expert". `fitting.fit_gate` then fits the
router rows (see there for the loss).

Routed experts get a softmax router. A gated shared expert (rows from `num_routed` on, Qwen2-MoE) gets a
one-row sigmoid gate fitted as "shared versus not": its positive prompts open it; its negative prompts and
the routed experts' positive prompts close it.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

from moeforge.config import Expert

log = logging.getLogger("moeforge")


def prompt_table(experts: Sequence[Expert]) -> Tuple[List[str], List[List[int]], List[List[int]]]:
    """Unique prompts, then per expert the indices of its positive and of its negative prompts."""
    index: Dict[str, int] = {}
    positives, negatives = [], []
    for expert in experts:
        positives.append([index.setdefault(p, len(index)) for p in expert.positive_prompts or []])
        negatives.append([index.setdefault(p, len(index)) for p in expert.negative_prompts or []])
    return list(index), positives, negatives


def routed_labels(owner, positives: List[List[int]], negatives: List[List[int]]):
    """(token rows, positive label, negative label) for a softmax router over these experts."""
    return _labels(owner, [(e, p, True) for e, p in enumerate(positives)] + [(e, n, False) for e, n in enumerate(negatives)])


def shared_labels(owner, shared_pos: List[int], shared_neg: List[int], routed_pos: List[List[int]]):
    """(token rows, positive label, negative label) for a one-row sigmoid gate: shared versus not."""
    closing = sorted({p for prompts in routed_pos for p in prompts} - set(shared_pos)) + list(shared_neg)
    return _labels(owner, [(0, shared_pos, True), (0, closing, False)])


def _labels(owner, groups):
    import torch

    rows, pos, neg = [], [], []
    for row, prompts, is_positive in groups:
        if not prompts:
            continue
        tokens = torch.nonzero(torch.isin(owner, torch.tensor(prompts)))[:, 0]
        rows.append(tokens)
        label = torch.full_like(tokens, row)
        none = torch.full_like(tokens, -1)
        pos.append(label if is_positive else none)
        neg.append(none if is_positive else label)
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(rows), torch.cat(pos), torch.cat(neg)


def fitted_gates(inputs):
    """(layers, experts, hidden) float32 router rows, and (layers, routed, hidden) prompt vectors for the checks."""
    import torch
    from tqdm.auto import tqdm

    from moeforge.gates.base_model import BaseModel
    from moeforge.gates.fitting import fit_gate

    experts = list(inputs.experts)
    n_routed = inputs.routed_count
    prompts, positives, negatives = prompt_table(experts)
    forced = []
    with BaseModel(inputs) as base:
        tokens = base.router_inputs(prompts)
        params = base.mlp_parameters() if inputs.checkpoints is not None else None
        if params is None and inputs.checkpoints is not None:
            log.info("fitted: the base cannot take the experts' MLPs (quantized or offloaded); "
                     "routers are fitted on the base's own hidden states")
        if params is not None:
            for e in tqdm(range(n_routed), desc="running each expert's prompts", unit="expert",
                          disable=inputs.options.quiet):
                with base.expert_mlps(inputs.checkpoints[e], experts[e], params):
                    forced.append(base.router_inputs([prompts[i] for i in positives[e]]))
    owner = tokens.prompt_of_token

    if forced:  # positives from the expert-forced passes, negatives from the base's
        neg_rows, _, only_neg = routed_labels(owner, [[] for _ in range(n_routed)], negatives[:n_routed])
        pos = torch.cat([torch.full((f.prompt_of_token.shape[0],), e) for e, f in enumerate(forced)]
                        + [torch.full_like(neg_rows, -1)])
        neg = torch.cat([torch.full((f.prompt_of_token.shape[0],), -1) for f in forced] + [only_neg])

        def routed_x(layer, x):
            return torch.cat([f.layers[layer].float() for f in forced] + [x[neg_rows]])
    else:
        rows, pos, neg = routed_labels(owner, positives[:n_routed], negatives[:n_routed])

        def routed_x(layer, x):
            return x[rows]

    shared = [shared_labels(owner, positives[s], negatives[s], positives[:n_routed]) for s in range(n_routed, len(experts))]
    gates = torch.zeros(inputs.num_layers, len(experts), inputs.hidden_size)
    vectors = torch.zeros(inputs.num_layers, n_routed, inputs.hidden_size)
    for layer in tqdm(range(inputs.num_layers), desc="fitting routers", unit="layer", disable=inputs.options.quiet):
        x = tokens.layers[layer].float()
        gates[layer, :n_routed] = fit_gate(routed_x(layer, x), pos, neg, rows=n_routed).weight
        for s, (rows_s, pos_s, neg_s) in enumerate(shared):
            gates[layer, n_routed + s] = fit_gate(x[rows_s], pos_s, neg_s, rows=1, kind="sigmoid").weight[0]
        vectors[layer] = mean_vectors(x, owner, positives[:n_routed], negatives[:n_routed])
    return gates, vectors


def mean_vectors(x, owner, positives: List[List[int]], negatives: List[List[int]]):
    """Per expert: mean router input of its positive tokens minus that of its negative tokens, unit length."""
    import torch

    def mean_of(prompts):
        sel = torch.isin(owner, torch.tensor(prompts, dtype=torch.long))
        return x[sel].mean(0) if sel.any() else torch.zeros(x.shape[1])

    rows = []
    for pos, neg in zip(positives, negatives):
        v = mean_of(pos) - (mean_of(neg) if neg else 0)
        rows.append(v / v.norm().clamp(min=1e-8))
    return torch.stack(rows)
