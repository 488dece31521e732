"""Router weights, one row per expert and layer, computed with mergekit-moe's math (see README)."""
from moeforge.gates.compute import GateInputs, compute_gates

__all__ = ["GateInputs", "compute_gates"]
