"""Run the `moeforge` command: in this process (click's CliRunner; the CLI path users take minus the
interpreter start-up, which costs seconds per call), or in a real process where the test is about the
process itself: signals, the modules it imports, what `--quiet` keeps libraries imported later from
printing."""
import logging
import os
import subprocess
import sys
from types import SimpleNamespace


def run(*args, env=None) -> SimpleNamespace:
    """Like subprocess.run(["moeforge", *args]): returncode, stdout, stderr; the exception in `exception`."""
    from click.testing import CliRunner

    from moeforge.cli import cli

    logger = logging.getLogger("moeforge")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        r = CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="moeforge")
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr, exception=r.exception)


def run_process(*args, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "moeforge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=300)
