"""Gemma and Gemma 2: Llama's tensor names, but blocks no MoE layout computes.

Gemma's RMSNorm scales by (1 + weight), its embeddings are multiplied by sqrt(hidden_size) and its MLP is
GeGLU; Gemma 2 adds logit soft-capping and norms after attention and after the MLP. The families are
recognised so that a build is refused with the features that no layout can express.
"""
from moeforge.families.base import Family
from moeforge.families.llama import LLAMA_MLP

GEMMA = Family(name="gemma", model_types=("gemma",), mlp=LLAMA_MLP,
               declared=frozenset({"offset_norm", "embed_scale"}))
GEMMA2 = Family(name="gemma2", model_types=("gemma2",), mlp=LLAMA_MLP,
                declared=frozenset({"offset_norm", "embed_scale", "sandwich_norm"}))
