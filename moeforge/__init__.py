"""moeforge: dense transformer checkpoints in, Mixture-of-Experts checkpoints out.

Heavy modules (torch, transformers) are imported only when a function that needs them is called.
"""
from moeforge._version import __version__

__all__ = ["__version__", "build", "dry_run", "MoEConfig", "BuildOptions", "MoeforgeError"]


def __getattr__(name):
    if name == "build":
        from moeforge.pipeline.build import build

        return build
    if name == "dry_run":
        from moeforge.pipeline.build import dry_run

        return dry_run
    if name == "MoEConfig":
        from moeforge.config import MoEConfig

        return MoEConfig
    if name == "BuildOptions":
        from moeforge.options import BuildOptions

        return BuildOptions
    if name == "MoeforgeError":
        from moeforge.errors import MoeforgeError

        return MoeforgeError
    raise AttributeError(f"module 'moeforge' has no attribute {name!r}")
