"""Run prompts through a built MoE and count, per layer, how often each expert is chosen."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from moeforge.errors import ConfigError, SourceError
from moeforge.files import RESOLVED_CONFIG
from moeforge.inspect.prompts_file import Prompt, resolve_labels

PLOT_HINT = "pip install moeforge[plot]"


@dataclasses.dataclass
class RoutingReport:
    model: str
    num_experts: int
    top_k: int
    layers: List[int]
    expert_names: List[str]
    prompts: int
    tokens: int
    top1: "object"  # torch.Tensor (layers, experts): tokens whose first choice is the expert
    topk: "object"  # (layers, experts): tokens with the expert among their top-k
    correct: Optional["object"] = None  # (layers,): labelled tokens whose first choice is their label
    labelled: int = 0
    bos_skipped: bool = False

    def share(self, counts):
        return counts.float() / max(self.tokens, 1)

    @property
    def agreement(self):
        """(layers,) share of labelled tokens routed first to their labelled expert, or None."""
        return None if self.correct is None or not self.labelled else self.correct.float() / self.labelled

    def table(self) -> str:
        e, col = self.num_experts, 7
        titles = ("chosen first (top-1)", f"in the top-{self.top_k}")
        width = max(col * e, *(len(t) + 1 for t in titles))
        lines = [
            f"{self.model}: {e} experts, top-{self.top_k}; {self.prompts} prompt{'' if self.prompts == 1 else 's'}, {self.tokens} tokens"
            + (" (the prepended bos is not counted)" if self.bos_skipped else ""),
            "experts: " + ", ".join(f"{i} = {n}" for i, n in enumerate(self.expert_names)),
            "",
            f"{'layer':>5}  " + "  ".join(t.rjust(width) for t in titles)
            + ("  label first" if self.agreement is not None else ""),
            f"{'':>5}  " + "  ".join("".join(f"{i:>{col}}" for i in range(e)).rjust(width) for _ in titles),
        ]
        top1, topk, agreement = self.share(self.top1), self.share(self.topk), self.agreement
        rows = [(str(layer), top1[i], topk[i], None if agreement is None else agreement[i])
                for i, layer in enumerate(self.layers)]
        rows.append(("mean", top1.mean(0), topk.mean(0), None if agreement is None else agreement.mean()))
        for name, t1, tk, agree in rows:
            cells = ["".join(_pct(v, col) for v in shares).rjust(width) for shares in (t1, tk)]
            line = f"{name:>5}  " + "  ".join(cells)
            if agree is not None:
                line += _pct(agree, 13)
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Heatmaps of the top-1 and top-k shares (layers x experts)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.1 * self.num_experts, 1.5 + 0.35 * len(self.layers)),
                                 squeeze=False, constrained_layout=True)
        for ax, counts, title in ((axes[0][0], self.top1, "chosen first (top-1)"),
                                  (axes[0][1], self.topk, f"in the top-{self.top_k}")):
            share = self.share(counts).numpy()
            image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_title(title)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_xticks(range(self.num_experts), [f"{i}\n{n[:12]}" for i, n in enumerate(self.expert_names)],
                          fontsize=7)
            ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers], fontsize=7)
            if share.size <= 400:
                for (row, column), value in _cells(share):
                    ax.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=6,
                            color="black" if value > 0.6 else "white")
        fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens")
        fig.suptitle(f"routing of {self.tokens} tokens through {Path(self.model).name}")
        fig.savefig(str(path), dpi=120)
        plt.close(fig)


def _cells(array):
    for row in range(array.shape[0]):
        for column in range(array.shape[1]):
            yield (row, column), float(array[row, column])


def _pct(value, width: int) -> str:
    return f"{100 * float(value):.1f}%".rjust(width)


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"--plot needs matplotlib: {PLOT_HINT}") from None


def expert_names(model_dir: Path, num_experts: int):
    """(display names, source_model strings) from the moeforge_config.yml the build left, else indices."""
    import yaml

    sources: List[str] = []
    recipe = model_dir / RESOLVED_CONFIG
    if recipe.is_file():
        try:
            experts = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("experts") or []
            sources = [str(e.get("source_model", "")) for e in experts if isinstance(e, dict)]
        except (yaml.YAMLError, OSError, AttributeError):
            sources = []
    if len(sources) != num_experts:
        return [str(i) for i in range(num_experts)], []
    return [Path(s).name or s for s in sources], sources


def inspect_model(model_dir, prompts: Sequence[Prompt], device: str = "auto", dtype: str = "auto",
                  batch_size: int = 8, trust_remote_code: bool = False, quiet: bool = False) -> RoutingReport:
    import json

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from moeforge.gates.loading import device_map
    from moeforge.gates.prompts import load_tokenizer_at, pad_id, tokenize
    from moeforge.inspect.routers import RouterRecorder, moe_shape

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{config_path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    num_experts, top_k = moe_shape(config)
    names, sources = expert_names(model_dir, num_experts)
    labels = resolve_labels(prompts, names, sources)
    tok = load_tokenizer_at(model_dir, str(model_dir), trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=device_map(device),
            trust_remote_code=trust_remote_code,
        ).eval()
    except (OSError, ValueError, ImportError) as e:
        raise SourceError(f"{model_dir}: transformers cannot load it ({type(e).__name__}: {str(e)[:300]})") from None

    hidden = model.config.hidden_size
    rows = model.get_input_embeddings().weight.shape[0]
    ids = tokenize(tok, [p.text for p in prompts], rows, getattr(model.config, "max_position_embeddings", None))
    pad = pad_id(tok, rows)
    skip_first = tok.bos_token is not None
    recorder = RouterRecorder(model, num_experts, hidden)
    n_layers = len(recorder.layers)
    top1 = torch.zeros(n_layers, num_experts, dtype=torch.long)
    topk = torch.zeros(n_layers, num_experts, dtype=torch.long)
    correct = torch.zeros(n_layers, dtype=torch.long)
    tokens = labelled = 0
    device_of_input = model.get_input_embeddings().weight.device
    with recorder, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in tqdm(range(0, len(ids), batch_size), desc="routing prompts", unit="batch", disable=quiet):
            batch, batch_labels = ids[start:start + batch_size], labels[start:start + batch_size]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(batch):
                input_ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            keep = mask.bool()
            if skip_first:
                keep[:, 0] = False
            token_labels = torch.tensor([-1 if l is None else l for l in batch_labels]).repeat_interleave(width)
            keep, token_labels = keep.reshape(-1), token_labels
            recorder.clear()
            model(input_ids=input_ids.to(device_of_input), attention_mask=mask.to(device_of_input), use_cache=False)
            for i, layer in enumerate(recorder.layers):
                logits = torch.cat(recorder.logits[layer])
                if logits.shape[0] != keep.shape[0]:
                    raise SourceError(f"layer {layer}: router saw {logits.shape[0]} tokens, expected {keep.shape[0]}")
                chosen = logits[keep].topk(top_k, dim=-1).indices
                top1[i] += torch.bincount(chosen[:, 0], minlength=num_experts)
                topk[i] += torch.bincount(chosen.reshape(-1), minlength=num_experts)
                kept_labels = token_labels[keep]
                correct[i] += int((chosen[:, 0] == kept_labels).sum())
            tokens += int(keep.sum())
            labelled += int((token_labels[keep] >= 0).sum())
    del model
    has_labels = any(l is not None for l in labels)
    return RoutingReport(str(model_dir), num_experts, top_k, recorder.layers, names, len(prompts), tokens, top1, topk,
                         correct if has_labels else None, labelled, skip_first)
