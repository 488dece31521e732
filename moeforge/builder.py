"""`moeforge.builder.build` / `dry_run`, as before: the pipeline lives in moeforge.pipeline."""
from moeforge.pipeline.build import BuildResult, build, dry_run, plan_tensors, shard_bytes, write_output
from moeforge.pipeline.inputs import ExpertChecks, Inputs, open_inputs

__all__ = ["build", "dry_run", "BuildResult", "Inputs", "ExpertChecks", "open_inputs", "plan_tensors", "shard_bytes",
           "write_output"]
