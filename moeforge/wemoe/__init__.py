"""Weight-Ensembling MoE (WEMoE, ICML 2024; E-WEMoE): merge fine-tuned models of one architecture, turn each
block's MLP into a routed mix of task vectors, and adapt only the routers at test time (entropy loss).

`check(config)` checks a recipe's data and sources; `run(config, out)` adapts and writes routers; `load(out)`
rebuilds the routed model; `evaluate(out)` scores it.
Heavy modules (torch, transformers) are imported only when these are called.
"""

__all__ = ["run", "check", "load", "evaluate", "WEMoEConfig", "WEMoEOptions"]


def __getattr__(name):
    if name in ("run", "check", "WEMoEOptions"):
        from moeforge.wemoe import pipeline

        return getattr(pipeline, name)
    if name == "load":
        from moeforge.wemoe.export import load

        return load
    if name == "evaluate":
        from moeforge.wemoe.evaluation import evaluate

        return evaluate
    if name == "WEMoEConfig":
        from moeforge.wemoe.config import WEMoEConfig

        return WEMoEConfig
    raise AttributeError(f"module 'moeforge.wemoe' has no attribute {name!r}")
