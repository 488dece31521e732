"""Mistral: Llama's tensor names; differs only in config (sliding window)."""
from moeforge.families.base import Family
from moeforge.families.llama import LLAMA_MLP

MISTRAL = Family(name="mistral", model_types=("mistral",), mlp=LLAMA_MLP)
