"""Llama: the reference dense layout (SwiGLU MLP: gate_proj, up_proj, down_proj)."""
from moeforge.families.base import Family

LLAMA_MLP = {
    "gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.up_proj.weight",
    "down": "model.layers.{layer}.mlp.down_proj.weight",
}

LLAMA = Family(name="llama", model_types=("llama",), mlp=LLAMA_MLP)
