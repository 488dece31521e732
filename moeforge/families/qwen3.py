"""Qwen3: Llama's MLP names; attention with per-head q_norm/k_norm."""
from moeforge.families.base import Family
from moeforge.families.llama import LLAMA_MLP

QWEN3 = Family(name="qwen3", model_types=("qwen3",), mlp=LLAMA_MLP)
