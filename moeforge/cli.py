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
@click.option("--device", default="auto", show_default=True, help="Device of the base model's forward pass (hidden and fitted gates): cpu, cuda, cuda:N or auto (all GPUs, then CPU).")
@click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True, help="Dtype of the base model's forward pass for hidden and fitted gates.")
@click.option("--load-in-4bit", is_flag=True, help="Run that forward pass with 4-bit bitsandbytes weights (pip install moeforge[quant]).")
@click.option("--load-in-8bit", is_flag=True, help="Run that forward pass with 8-bit bitsandbytes weights (pip install moeforge[quant]).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the base model's repository.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True, help="Allow every expert to be the same model (sparse upcycling).")
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


@cli.command("inspect")
@click.argument("model_path", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False), help="Prompts: .txt (one per line) or .jsonl (strings, or {\"text\": ..., \"expert\": index or name}).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also save a heatmap PNG here (pip install moeforge[plot]).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (all GPUs, then CPU).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True, help="Dtype to run the model in (auto: the checkpoint's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from OUT.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def inspect_cmd(model_path, prompts_path, plot_path, device, dtype, batch_size, trust_remote_code, verbose, quiet):
    """Report how often each expert of the MoE in OUT is chosen, per layer, for some prompts."""
    _setup_logging(verbose, quiet)

    def run(verbose):
        from moeforge.gates.loading import check_device
        from moeforge.inspect import inspect_model
        from moeforge.inspect.prompts_file import read_prompts
        from moeforge.inspect.report import check_plot_available

        check_device(device)
        if plot_path:
            check_plot_available()
        report = inspect_model(model_path, read_prompts(prompts_path), device=device, dtype=dtype,
                               batch_size=batch_size, trust_remote_code=trust_remote_code, quiet=quiet)
        click.echo(report.table())
        if plot_path:
            report.plot(plot_path)
            click.echo(f"heatmap: {plot_path}")

    _run(run, verbose=verbose)


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
