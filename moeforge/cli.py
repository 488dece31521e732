"""Command line. Imports only click at start-up; each command imports what it needs."""
from __future__ import annotations

import contextlib
import logging
import sys

import click

from moeforge._version import __version__
from moeforge.cli_compat import HELP_LINE, apply_mergekit_options, mergekit_compat_options
from moeforge.gate_modes import GATE_MODE_NAMES, RANDOM_GATE_MODES
from moeforge.layouts import LAYOUT_NAMES


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"moeforge: {record.levelname.lower()}: {record.getMessage()}"


class _Handler(logging.StreamHandler):
    """Ours, so a second command in one process replaces it and leaves other handlers alone."""


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = _Handler(sys.stderr)
    handler.setFormatter(_Formatter())
    log = logging.getLogger("moeforge")
    for old in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(old)
    log.addHandler(handler)
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


def output_options(fn):
    """Flags shared by every command that writes a checkpoint."""
    for option in reversed([
        click.option("--random-seed", type=int, default=None, help="Seed for random gates and noise (default: drawn, recorded in the output)."),
        click.option("--out-shard-size", default="5B", show_default=True, help="Max shard size: parameters (5B, 500M) or bytes (4GB, 4GiB)."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the base's tokenizer files."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True, help="Write README.md, the model card."),
        click.option("--device", default="auto", show_default=True, help="Device of the base model's forward pass (hidden and fitted gates): cpu, cuda, cuda:N or auto (all GPUs, then CPU)."),
        click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True, help="Dtype of the base model's forward pass for hidden and fitted gates."),
        click.option("--load-in-4bit", is_flag=True, help="Run that forward pass with 4-bit bitsandbytes weights (pip install moeforge[quant])."),
        click.option("--load-in-8bit", is_flag=True, help="Run that forward pass with 8-bit bitsandbytes weights (pip install moeforge[quant])."),
        click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Allow custom model code from the base model's repository."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new build is complete)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted build of the same inputs, reusing its verified shards."),
        click.option("--hash-sources/--no-hash-sources", default=True, show_default=True, help="Record sha256 of every source file in the manifest (off: size and mtime)."),
        click.option("--check-finite/--no-check-finite", default=True, show_default=True, help="Stop on NaN/Inf in any source tensor (checked while each source is read for its sha256)."),
        click.option("--push-to-hub", metavar="ORG/NAME", default=None, help="After the build, upload OUT to this Hub repo (see `moeforge upload`)."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors."),
        click.option("--quiet/--no-quiet", default=False, help="No progress bars or info messages."),
    ]):
        fn = option(fn)
    return fn


@cli.command("build", epilog=HELP_LINE)
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@output_options
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True, help="Allow every expert to be the same model with prompt-based gates (random gates need no flag).")
@click.option("--allow-crimes/--no-allow-crimes", default=False, help="Allow experts from other model families than the base.")
@click.option("--strict", is_flag=True, help="Every unknown config key is an error (default: a warning, as mergekit-moe ignores them).")
@click.option("--dry-run", is_flag=True, help="Check the sources and print what would be written (as `moeforge plan`); write nothing.")
@mergekit_compat_options
def build_cmd(config_path, out_path, dry_run, **options):
    """Build an MoE checkpoint in OUT from the YAML recipe CONFIG."""
    if dry_run:
        return _plan(config_path, out_path, **options)
    _build(config_path, out_path, **options)


def plan_cmd(config_path, out_path, **options):
    """Check every source of the YAML recipe CONFIG from headers alone and print what `build` would write:
    parameters, shards, estimated peak memory, and free disk at OUT (default: here). Reads no tensor data."""
    _plan(config_path, out_path, **options)


# `plan` takes build's options (they change the plan), so it cannot drift from `build`.
cli.add_command(click.Command(
    "plan", callback=plan_cmd, help=plan_cmd.__doc__, params=[
        click.Argument(["config_path"], metavar="CONFIG", type=click.Path(dir_okay=False)),
        click.Argument(["out_path"], metavar="[OUT]", required=False, type=click.Path(file_okay=True)),
        *(p for p in build_cmd.params if isinstance(p, click.Option) and p.name != "dry_run"),
    ],
))


def _plan(config_path, out_path, verbose, quiet, **options):
    _setup_logging(verbose, quiet)
    options = _run(apply_mergekit_options, options)
    from moeforge.pipeline.build import dry_run
    from moeforge.plan.report import disk_shortfall

    report = _run(dry_run, config_path, out_path, verbose=verbose, quiet=quiet, **options)
    click.echo(f"moeforge plan: {config_path}" + (f" -> {out_path}" if out_path else ""))
    for line in report.lines():
        click.echo(f"  {line}")
    problem = disk_shortfall(report)
    if problem:
        click.echo(f"moeforge: error: {problem}", err=True)
        sys.exit(1)


@cli.command("upcycle")
@click.argument("model", metavar="MODEL")
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@click.option("--num-experts", type=click.IntRange(min=1), required=True, help="Number of expert copies N.")
@click.option("--experts-per-token", type=click.IntRange(min=1), default=2, show_default=True, help="Top-k (per copy).")
@click.option("--architecture", type=click.Choice(LAYOUT_NAMES), default=None, help="Output layout (default: inferred).")
@click.option("--gate-mode", type=click.Choice(RANDOM_GATE_MODES), default="uniform_random", show_default=True, help="Router init.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Output dtype (default: the model's).")
@click.option("--noise-scale", type=click.FloatRange(min=0), default=None, help="Gaussian noise added to each expert's weights.")
@click.option("--drop-ratio", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Drop-Upcycling: share of neurons re-initialised per expert.")
@click.option("--granularity", type=click.IntRange(min=1), default=1, show_default=True, help="Fine-grained experts: segments per copy.")
@output_options
def upcycle_cmd(model, out_path, num_experts, experts_per_token, architecture, gate_mode, dtype, noise_scale,
                drop_ratio, granularity, **options):
    """Turn one dense MODEL into an N-expert MoE in OUT, ready for training (sparse upcycling)."""
    upcycle = {"source_model": model, "num_experts": num_experts, "drop_ratio": drop_ratio,
               "granularity": granularity, **({"noise_scale": noise_scale} if noise_scale else {})}
    config = {"upcycle": upcycle, "experts_per_token": experts_per_token, "gate_mode": gate_mode,
              **({"dtype": dtype} if dtype else {}), **({"architecture": architecture} if architecture else {})}
    _build(config, out_path, **options)


def _build(config, out_path, verbose, quiet, **options):
    _setup_logging(verbose, quiet)
    options = _run(apply_mergekit_options, options)
    if options["push_to_hub"] and not quiet:
        logging.getLogger("moeforge").setLevel(min(logging.INFO, logging.getLogger("moeforge").level))
    from moeforge.pipeline.build import build

    with _sigterm_interrupts():
        result = _run(build, config, out_path, verbose=verbose, quiet=quiet, **options)
    if not quiet:
        click.echo(f"moeforge: {result.summary()}", err=True)
    if result.hub_url:
        click.echo(result.hub_url)


@cli.command("upload")
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option("--revision", metavar="BRANCH", default=None, help="Upload to this branch (created from main if needed).")
@click.option("--commit-message", default=None, help="Message of the (last) commit.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; contact nothing.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages; only the URL.")
def upload_cmd(out_path, repo_id, verbose, quiet, **options):
    """Upload the checkpoint in OUT to the Hugging Face Hub repo ORG/NAME (resumable).

    The token comes from HF_TOKEN or the saved login (`hf auth login`). Files already on the Hub with the
    same content are skipped, so an interrupted upload resumes when run again.
    """
    _setup_logging(verbose, quiet)
    if not quiet:
        logging.getLogger("moeforge").setLevel(min(logging.INFO, logging.getLogger("moeforge").level))
    from moeforge.hub import upload

    result = _run(lambda verbose: upload(out_path, repo_id, **options), verbose=verbose)
    if result.dry_run:
        click.echo(result.listing())
        return
    if not quiet:
        click.echo(
            f"moeforge: uploaded {len(result.uploaded)} file(s), skipped {len(result.skipped)} already there"
            + (f", removed {len(result.deleted)} stale" if result.deleted else ""),
            err=True,
        )
    click.echo(result.url)


class _DefaultRunGroup(click.Group):
    """`moeforge wemoe CONFIG OUT` is short for `moeforge wemoe run CONFIG OUT`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group("wemoe", cls=_DefaultRunGroup)
def wemoe_group():
    """Weight-Ensembling MoE: merge fine-tuned models, adapt routers at test time, export the routers.

    `moeforge wemoe CONFIG OUT` is short for `moeforge wemoe run CONFIG OUT`.
    """


@wemoe_group.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=True))
@click.option("--max-steps", type=click.IntRange(min=0), default=None, help="Adaptation steps (default: tta.max_steps).")
@click.option("--seed", type=int, default=None, help="Seed for router init and batch order (default: the config's seed).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=None, help="Save a resumable checkpoint every K steps (0: never; default: tta.checkpoint_every).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None, help="Where checkpoints go (default: OUT.wemoe-checkpoint beside OUT; removed on success).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in the checkpoint directory.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to adapt (under `accelerate launch`, accelerate places processes).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new output is complete).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="No progress bar or info messages.")
def wemoe_run_cmd(config_path, out_path, verbose, quiet, **options):
    """Merge the models of CONFIG, adapt the routers on the tasks' unlabeled data, write routers to OUT."""
    _setup_logging(verbose, quiet)
    from moeforge.wemoe.pipeline import run

    result = _run(run, config_path, out_path, verbose=verbose, quiet=quiet, **options)
    if not quiet and result is not None and result.is_main_process:
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


@wemoe_group.command("eval")
@click.argument("out_path", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--data", "data", multiple=True, metavar="TASK=PATH", help="Labelled data for a task (default: the config's data). Repeatable.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score at most this many inputs per task.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON here.")
@click.option("--no-verify", is_flag=True, help="Skip checking the sources' sha256 against wemoe.json.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", is_flag=True, help="Print only the table.")
def wemoe_eval_cmd(out_path, data, batch_size, limit, device, json_path, no_verify, verbose, quiet):
    """Per-task accuracy of OUT beside the pretrained model, each fine-tuned model and task arithmetic."""
    _setup_logging(verbose, quiet)
    from moeforge.errors import ConfigError

    pairs = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            click.echo(f"moeforge: error: --data: expected TASK=PATH, got {item!r}", err=True)
            sys.exit(ConfigError.exit_code)
        pairs[name] = path

    def evaluate_and_print(**kwargs):
        import json

        from moeforge.wemoe.evaluation import evaluate

        report = evaluate(out_path, pairs, batch_size=batch_size, device=device, limit=limit, verify=not no_verify)
        click.echo(report.table())
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(report.to_json(), f, indent=2)
        return report

    _run(evaluate_and_print, verbose=verbose)




@cli.command("add-expert")
@click.argument("moe_dir", metavar="MOE_DIR", type=click.Path(file_okay=False))
@click.option("--expert", "expert_model", required=True, help="Dense model whose MLPs become the new expert (directory, org/name, model+lora).")
@click.option("--prompt", "--prompts", "prompts", multiple=True, help="A positive prompt for the new expert's router row (repeat for more).")
@click.option("--negative-prompt", "negative_prompts", multiple=True, help="A negative prompt (repeat for more).")
@click.option("--out", "out_dir", type=click.Path(file_okay=True), default=None, help="Write the result here instead of replacing MOE_DIR.")
@click.option("--gate-mode", type=click.Choice(GATE_MODE_NAMES), default=None, help="Router mode (default: the one recorded in MOE_DIR/moeforge_config.yml).")
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


@cli.command("schema")
@click.argument("kind", metavar="[build|wemoe]", type=click.Choice(["build", "wemoe"]), default="build")
@click.option("--markdown", is_flag=True, help="Print the configuration reference (docs/configuration.md) instead.")
def schema_cmd(kind, markdown):
    """Print the JSON Schema of build (default) or wemoe recipes, for editors that validate YAML."""
    from moeforge import schema

    click.echo(schema.markdown() if markdown else schema.json_text(kind), nl=False)


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
        for line in str(e).splitlines():  # several problems: one line each
            click.echo(f"moeforge: error: {line}", err=True)
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
