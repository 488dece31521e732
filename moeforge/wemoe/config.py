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

    optimizer: Literal["adam"] = "adam"
    lr: float = Field(1.0e-4, gt=0)
    max_steps: int = Field(1000, ge=0)
    batch_size: int = Field(16, ge=1)
    grad_accumulate: bool = True
    checkpoint_every: int = Field(100, ge=0)  # 0: never
    num_workers: int = Field(0, ge=0)


class Task(_Strict):
    """One fine-tuned model and the unlabeled inputs of its task."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    source_model: str = Field(min_length=1)
    data: str = Field(min_length=1)
    classes: Optional[List[str]] = None


class WEMoEConfig(YamlConfig):
    family: Family
    base_model: str = Field(min_length=1)
    experts: List[Task] = Field(min_length=1)
    templates: Optional[List[str]] = None
    init_lambda: float = 0.3
    router_hidden_layers: int = Field(2, ge=0, le=2)
    router_init_std: float = Field(0.01, ge=0)
    batch_reduce: bool = True
    sparsity: Optional[float] = Field(None, ge=0, lt=1)
    shared_router: Optional[bool] = None
    max_length: int = Field(128, ge=2)
    seed: int = 0
    tta: TTAOptions = TTAOptions()

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
