"""Command line. Imports only click at start-up; each command imports what it needs."""
from __future__ import annotations

import logging
import sys

import click

from moeforge._version import __version__


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"moeforge: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log = logging.getLogger("moeforge")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    log.propagate = False
    import os

    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"  # transformers' own loading bars


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="moeforge")
def cli():
    """Turn dense transformer checkpoints into Mixture-of-Experts checkpoints."""


@cli.command("build")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@click.option("--random-seed", type=int, default=None, help="Seed for random gates and noise (default: drawn, recorded in the output).")
@click.option("--out-shard-size", default="5B", show_default=True, help="Max shard size: parameters (5B, 500M) or bytes (4GB, 4GiB).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the base's tokenizer files.")
@click.option("--device", default="auto", show_default=True, help="Device for hidden-state gates: cpu, cuda, cuda:N or auto.")
@click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True, help="Dtype of the base model's forward pass for hidden gates.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the base model's repository.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True, help="Allow every expert to be the same model (sparse upcycling).")
@click.option("--allow-crimes", is_flag=True, help="Allow experts from other model families than the base.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new build is complete).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or info messages.")
def build_cmd(config_path, out_path, verbose, quiet, **options):
    """Build an MoE checkpoint in OUT from the YAML recipe CONFIG."""
    _setup_logging(verbose, quiet)
    from moeforge.builder import build

    result = _run(build, config_path, out_path, verbose=verbose, quiet=quiet, **options)
    if not quiet:
        click.echo(f"moeforge: {result.summary()}", err=True)


# as config.GateMode, listed here so that --help does not import pydantic
_GATE_MODES = ["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]


@cli.command("add-expert")
@click.argument("moe_dir", metavar="MOE_DIR", type=click.Path(file_okay=False))
@click.option("--expert", "expert_model", required=True, help="Dense model whose MLPs become the new expert (directory, org/name, model+lora).")
@click.option("--prompt", "--prompts", "prompts", multiple=True, help="A positive prompt for the new expert's router row (repeat for more).")
@click.option("--negative-prompt", "negative_prompts", multiple=True, help="A negative prompt (repeat for more).")
@click.option("--out", "out_dir", type=click.Path(file_okay=True), default=None, help="Write the result here instead of replacing MOE_DIR.")
@click.option("--gate-mode", type=click.Choice(_GATE_MODES), default=None, help="Router mode (default: the one recorded in MOE_DIR/moeforge_config.yml).")
@click.option("--base-model", default=None, help="Dense base for hidden gates (default: the one recorded in MOE_DIR/moeforge_config.yml).")
@click.option("--random-seed", type=int, default=None, help="Seed for random gates and noise.")
@click.option("--out-shard-size", default="5B", show_default=True, help="Max shard size: parameters (5B, 500M) or bytes (4GB, 4GiB).")
@click.option("--device", default="auto", show_default=True, help="Device for hidden-state gates.")
@click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True, help="Dtype of the base model's forward pass for hidden gates.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the base model's repository.")
@click.option("--allow-crimes", is_flag=True, help="Allow an expert from a family the MoE's layout does not take.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or info messages.")
def add_expert_cmd(moe_dir, verbose, quiet, **options):
    """Append an expert (and its router row) to the MoE checkpoint in MOE_DIR."""
    _setup_logging(verbose, quiet)
    from moeforge.edit import add_expert

    result = _run(add_expert, moe_dir, verbose=verbose, quiet=quiet, **options)
    if not quiet:
        click.echo(f"moeforge: {result.summary}", err=True)


@cli.command("extract")
@click.argument("moe_dir", metavar="MOE_DIR", type=click.Path(file_okay=False))
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=True))
@click.option("--expert", type=int, required=True, help="Index of the routed expert to extract (0-based).")
@click.option("--out-shard-size", default="5B", show_default=True, help="Max shard size: parameters (5B, 500M) or bytes (4GB, 4GiB).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new model is complete).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or info messages.")
def extract_cmd(moe_dir, out_dir, expert, verbose, quiet, **options):
    """Write to OUT the dense model whose MLP is expert N of the MoE in MOE_DIR."""
    _setup_logging(verbose, quiet)
    from moeforge.edit import extract_expert

    result = _run(extract_expert, moe_dir, expert, out_dir, verbose=verbose, quiet=quiet, **options)
    if not quiet:
        click.echo(f"moeforge: {result.summary}", err=True)


def _run(fn, *args, **kwargs):
    """Users see one line and an exit code; tracebacks only with -v."""
    from moeforge.errors import MoeforgeError

    verbose = kwargs.get("verbose", False)
    try:
        return fn(*args, **kwargs)
    except MoeforgeError as e:
        if verbose:
            raise
        click.echo(f"moeforge: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("moeforge: interrupted; nothing was written to the output path", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("moeforge: error: out of memory", err=True)
        sys.exit(1)
    except OSError as e:
        if verbose:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"moeforge: error: {where}{e.strerror or e}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug: still one line, with the way to get details
        if verbose:
            raise
        click.echo(f"moeforge: internal error: {type(e).__name__}: {e} (rerun with -v for a traceback)", err=True)
        sys.exit(1)


def main():
    cli(prog_name="moeforge")


if __name__ == "__main__":
    main()
