"""The `moeforge wemoe` YAML schema: unknown keys are errors, problems are reported as one line."""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional, Union

from pydantic import Field, model_validator

from moeforge.config import YamlConfig, _Strict

Family = Literal["clip-vision", "causal-lm"]
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class TTAOptions(_Strict):
    """Test-time adaptation; defaults are FusionBench's for CLIP."""

    optimizer: Literal["adam"] = Field("adam", description="Adam, on the router parameters only.")
    lr: float = Field(1.0e-4, gt=0, description="Learning rate.")
    max_steps: int = Field(1000, ge=0, description="Adaptation steps; each step draws one batch per task.")
    batch_size: int = Field(16, ge=1, description="Inputs per task and per process in each step.")
    grad_accumulate: bool = Field(True, description=(
        "Backward task by task (less memory). With false the task losses are summed and backward runs once; "
        "the gradient is the same."))
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every K steps (0: never).")
    num_workers: int = Field(0, ge=0, description="DataLoader processes per task, for image decoding.")


class Task(_Strict):
    """One fine-tuned model and the unlabeled inputs of its task."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description=(
        "The task's name: letters, digits, `.`, `_`, `-`; unique."))
    source_model: str = Field(min_length=1, description=(
        "The model fine-tuned on this task from `base_model` (clip-vision: a CLIPModel or CLIPVisionModel)."))
    data: str = Field(min_length=1, description=(
        "The task's unlabeled inputs: an image folder with one subfolder per class, a `datasets` "
        "`save_to_disk` directory, or (causal-lm) a `.txt` (one text per line) or `.jsonl` (`{\"text\": ...}`) file."))
    classes: Optional[List[str]] = Field(None, description="clip-vision only, required: class names for the zero-shot head.")


class WEMoEConfig(YamlConfig):
    """A `moeforge wemoe` recipe: a pretrained model, one fine-tuned model per task, and each task's inputs."""

    family: Family = Field(description=(
        "`clip-vision`: a transformers CLIP model; only the vision tower is merged and routed, heads are "
        "zero-shot from the class names. `causal-lm`: a causal LM whose decoder blocks have an `mlp`; "
        "every weight is merged."))
    base_model: str = Field(min_length=1, description=(
        "The pretrained model the experts were fine-tuned from (clip-vision: a CLIPModel with its text "
        "tower, tokenizer and image processor)."))
    experts: List[Task] = Field(min_length=1, description="One fine-tuned model per task, with the task's inputs.")
    templates: Optional[List[str]] = Field(None, description=(
        "clip-vision only: prompt templates for the zero-shot head, each with `{}` for the class name. "
        "Default: `[\"a photo of a {}.\"]`."))
    init_lambda: float = Field(0.3, description="The task-arithmetic scale, and the initial bias of each router output.")
    router_hidden_layers: int = Field(2, ge=0, le=2, description=(
        "0: one learned weight per task (input-independent). 1: `Linear(H, N)`. "
        "2: `Linear(H, H)`, ReLU, `Linear(H, N)`. No softmax."))
    router_init_std: float = Field(0.01, ge=0, description=(
        "Std of the router weights at initialisation (output bias `init_lambda`, hidden bias 0). With 0, "
        "step 0 is exactly task arithmetic."))
    batch_reduce: bool = Field(True, description=(
        "During adaptation, also average the routing weights over the batch (one merged MLP per batch). "
        "A loaded model always routes sample by sample."))
    sparsity: Optional[float] = Field(None, ge=0, lt=1, description=(
        "E-WEMoE: keep only the largest-magnitude `1 - sparsity` share of each MLP task vector's entries, "
        "per tensor and per task (0.9 in the paper)."))
    shared_router: Optional[bool] = Field(None, description=(
        "One router shared by every block (E-WEMoE) instead of one per block. Default: true when "
        "`sparsity` is set."))
    max_length: int = Field(128, ge=2, description="causal-lm: tokens per text.")
    seed: int = Field(0, description="Seed of the router initialisation and the batch order.")
    tta: TTAOptions = Field(TTAOptions(), description="Test-time adaptation of the routers.")

    @model_validator(mode="after")
    def _check(self) -> "WEMoEConfig":
        seen = set()
        for i, task in enumerate(self.experts):
            if task.name in seen:
                raise ValueError(f"experts.{i}.name: {task.name!r} is used twice; task names must be unique")
            seen.add(task.name)
        if self.family == "clip-vision":
            for i, task in enumerate(self.experts):
                if not task.classes:
                    raise ValueError(f"experts.{i}.classes: required for family clip-vision (the zero-shot head's class names)")
                if len(set(task.classes)) != len(task.classes):
                    raise ValueError(f"experts.{i}.classes: class names must be unique")
            for i, t in enumerate(self.templates or ()):
                if "{}" not in t:
                    raise ValueError(f"templates.{i}: {t!r} has no '{{}}' where the class name goes")
        else:
            for i, task in enumerate(self.experts):
                if task.classes is not None:
                    raise ValueError(f"experts.{i}.classes: only for family clip-vision")
            if self.templates is not None:
                raise ValueError("templates: only for family clip-vision")
        return self

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.experts]

    @property
    def resolved_templates(self) -> List[str]:
        return list(self.templates or DEFAULT_TEMPLATES)

    @property
    def uses_shared_router(self) -> bool:
        """E-WEMoE shares one router across blocks; plain WEMoE has one per block."""
        return self.shared_router if self.shared_router is not None else self.sparsity is not None


def load_wemoe_config(config_or_path: Union[WEMoEConfig, dict, str, Path]) -> WEMoEConfig:
    return WEMoEConfig.load(config_or_path)
