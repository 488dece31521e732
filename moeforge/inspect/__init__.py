"""`moeforge inspect`: which experts a built MoE's routers choose for some prompts, per layer."""
from moeforge.inspect.report import RoutingReport, inspect_model
from moeforge.inspect.routers import RouterRecorder, find_routers, moe_shape

__all__ = ["RoutingReport", "inspect_model", "RouterRecorder", "find_routers", "moe_shape"]
