"""The tensor plan: every output tensor's name, shape, dtype and where its bytes come from."""
from moeforge.plan.tensors import FromConcat, FromSource, FromValue, PlannedTensor
from moeforge.plan.moe import MoEPlan, plan_moe

__all__ = ["PlannedTensor", "FromSource", "FromConcat", "FromValue", "MoEPlan", "plan_moe"]
