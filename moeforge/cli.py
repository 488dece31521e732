"""Command line. Imports only click at start-up; each command imports what it needs."""
from __future__ import annotations

import contextlib
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
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new build is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted build of the same inputs, reusing its verified shards.")
@click.option("--hash-sources/--no-hash-sources", default=True, show_default=True, help="Record sha256 of every source file in the manifest (off: size and mtime).")
@click.option("--check-finite", is_flag=True, help="Also scan tensors copied byte for byte for NaN/Inf (one extra read).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or info messages.")
def build_cmd(config_path, out_path, verbose, quiet, **options):
    """Build an MoE checkpoint in OUT from the YAML recipe CONFIG."""
    _setup_logging(verbose, quiet)
    from moeforge.builder import build

    with _sigterm_interrupts():
        result = _run(build, config_path, out_path, verbose=verbose, quiet=quiet, **options)
    if not quiet:
        click.echo(f"moeforge: {result.summary()}", err=True)


@cli.command("verify")
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@click.option("--quick", is_flag=True, help="Headers only: skip sha256 and the NaN/Inf scan (no tensor data is read).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
def verify_cmd(out_path, quick, verbose):
    """Check OUT against its manifest, its index and its config.json, and scan it for NaN/Inf.

    Exit status 0 only when everything holds; 1 when a problem is found (one line each).
    """
    _setup_logging(verbose, quiet=False)
    from moeforge.verify import verify

    report = _run(verify, out_path, hashes=not quick, values=not quick, traceback=verbose)
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (kill, systemd, a batch scheduler) is handled like Ctrl-C: the partial build is kept."""
    import signal

    from moeforge.errors import Interrupted

    def stop(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (embedded use): keep the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(fn, *args, traceback=None, **kwargs):
    """Users see one line and an exit code; tracebacks only with -v (`traceback`, else fn's `verbose`)."""
    from moeforge.errors import Interrupted, MoeforgeError

    verbose = kwargs.get("verbose", False) if traceback is None else traceback
    try:
        return fn(*args, **kwargs)
    except MoeforgeError as e:
        if verbose:
            raise
        click.echo(f"moeforge: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        stop = e if isinstance(e, Interrupted) else Interrupted()
        click.echo(f"moeforge: {stop}", err=True)
        sys.exit(stop.exit_code)
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
