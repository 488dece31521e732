"""The build pipeline: inputs (below), side files, and the orchestrator on top (build.py)."""
