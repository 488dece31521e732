"""Qwen2: Llama's MLP names; attention with q/k/v biases."""
from moeforge.families.base import Family
from moeforge.families.llama import LLAMA_MLP

QWEN2 = Family(name="qwen2", model_types=("qwen2",), mlp=LLAMA_MLP)
