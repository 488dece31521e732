"""What WEMoE needs to know about each model family: which tensors are merged, where the MLPs are,
how a batch is made from raw inputs and how task logits (for the entropy loss and accuracy) are computed."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from moeforge.errors import MoeforgeError, SourceError


class ClipVision:
    """CLIP image classification with zero-shot heads: only the vision tower is merged and routed."""

    name = "clip-vision"
    scope_prefix = "vision_model."
    blocks_path = "vision_model.encoder.layers"
    data_kind = "images"

    def check_base(self, ckpt) -> None:
        mt = ckpt.config_value("model_type")
        if mt != "clip" or "text_config" not in ckpt.config:
            raise SourceError(
                f"{ckpt.label}: base_model must be a CLIPModel checkpoint with vision and text towers "
                f"(model_type 'clip'), got model_type {mt!r}"
            )

    def check_expert(self, ckpt) -> None:
        mt = ckpt.config_value("model_type")
        if mt not in ("clip", "clip_vision_model"):
            raise SourceError(f"{ckpt.label}: expected a CLIPModel or CLIPVisionModel checkpoint, got model_type {mt!r}")

    def load_model(self, path: str):
        import torch
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(path, dtype=torch.float32).eval()

    def blocks(self, model):
        return self.blocks_path, model.vision_model.encoder.layers

    def hidden_size(self, model) -> int:
        return model.config.vision_config.hidden_size

    def in_scope(self, name: str) -> bool:
        return name.startswith(self.scope_prefix)

    def source_name(self, ckpt, name: str) -> Optional[str]:
        """CLIPModel files and transformers 4 CLIPVisionModel files keep the `vision_model.` prefix; version 5
        CLIPVisionModel files drop it."""
        if name in ckpt.tensors:
            return name
        short = name[len(self.scope_prefix):]
        return short if short in ckpt.tensors else None

    def scope_modules(self, model):
        """The modules that run per input: the vision tower and its projection (the text tower builds heads once)."""
        return [model.vision_model, model.visual_projection]

    def runtime(self, model, base_path: str, config) -> "ClipRuntime":
        return ClipRuntime(model, base_path, config)


def zero_shot_head(model, tokenizer, classes, templates, device="cpu"):
    """(classes, dim): each class name under every template, embedded by the CLIP text tower, normalised,
    averaged over templates and normalised again (the CLIP / task-arithmetic zero-shot classifier)."""
    import torch

    with torch.no_grad():
        batch = tokenizer([t.format(c) for c in classes for t in templates], padding=True,
                          return_tensors="pt").to(device)
        emb = model.get_text_features(**batch).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.view(len(classes), len(templates), -1).mean(1)
        return emb / emb.norm(dim=-1, keepdim=True)


class ClipRuntime:
    def __init__(self, model, base_path: str, config):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            self.processor = AutoImageProcessor.from_pretrained(base_path)
            tokenizer = AutoTokenizer.from_pretrained(base_path)
        except Exception as e:  # transformers raises many types for missing or broken processor files
            raise SourceError(f"{base_path}: cannot load its tokenizer and image processor "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        self.heads: Dict[str, torch.Tensor] = {}
        templates = config.resolved_templates
        device = next(model.parameters()).device
        for task in config.experts:
            self.heads[task.name] = zero_shot_head(model, tokenizer, task.classes, templates, device)
        self.logit_scale = model.logit_scale.exp().detach()

    def to(self, device) -> "ClipRuntime":
        self.heads = {k: v.to(device) for k, v in self.heads.items()}
        self.logit_scale = self.logit_scale.to(device)
        return self

    def collate(self, items: List[Tuple[object, Optional[int]]]) -> dict:
        import torch

        pixels = self.processor(images=[img for img, _ in items], return_tensors="pt")["pixel_values"]
        labels = [lab for _, lab in items]
        out = {"pixel_values": pixels}
        if all(lab is not None for lab in labels):
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def logits(self, model, task: str, batch: dict):
        """(batch, classes): cosine similarity of image embeddings to the task's class embeddings, scaled."""
        emb = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.logit_scale * emb @ self.heads[task].T

    def correct(self, logits, batch: dict) -> Tuple[int, int]:
        if "labels" not in batch:
            raise MoeforgeError("accuracy needs labelled data")
        return int((logits.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])

    @staticmethod
    def token_mask(batch: dict):
        return None


class CausalLM:
    """A Hugging Face causal LM: every parameter is merged; each decoder block's MLP is routed."""

    name = "causal-lm"
    data_kind = "texts"

    def check_base(self, ckpt) -> None:
        if "text_config" in ckpt.config and ckpt.config_value("model_type") == "clip":
            raise SourceError(f"{ckpt.label}: is a CLIP model; use family clip-vision")

    check_expert = check_base

    def load_model(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def blocks(self, model):
        from torch import nn

        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m)]
        if len(found) != 1:
            raise SourceError(f"{type(model).__name__}: cannot find its decoder blocks (a list of modules with an `mlp`)")
        return found[0]

    def hidden_size(self, model) -> int:
        return model.config.get_text_config().hidden_size

    def in_scope(self, name: str) -> bool:
        return True

    def source_name(self, ckpt, name: str) -> Optional[str]:
        return name if name in ckpt.tensors else None

    def scope_modules(self, model):
        return [model]

    def runtime(self, model, base_path: str, config) -> "CausalRuntime":
        return CausalRuntime(base_path, config)


class CausalRuntime:
    def __init__(self, base_path: str, config):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        except Exception as e:
            raise SourceError(f"{base_path}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
        if self.tokenizer.pad_token_id is None:  # in memory only; padding is masked out
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.max_length = config.max_length

    def to(self, device) -> "CausalRuntime":
        return self

    def collate(self, items) -> dict:
        texts = [t for t, _ in items]
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def logits(self, model, task: str, batch: dict):
        """(real tokens, vocab): each real position's next-token distribution."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = self._predicting(batch)
        return out[:, :-1][keep]

    @staticmethod
    def _predicting(batch):
        m = batch["attention_mask"].bool()
        return m[:, :-1] & m[:, 1:]

    def correct(self, logits, batch: dict) -> Tuple[int, int]:
        targets = batch["input_ids"][:, 1:][self._predicting(batch)]
        return int((logits.argmax(-1) == targets).sum()), int(targets.numel())

    @staticmethod
    def token_mask(batch: dict):
        return batch.get("attention_mask")


FAMILIES = {"clip-vision": ClipVision(), "causal-lm": CausalLM()}


def family_named(name: str):
    return FAMILIES[name]
