"""The command line: flags, exit codes, one-line errors, nothing left at OUT on failure, fast --help."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import expert_config
from run_cli import run, run_process


def write_config(tmp_path, cfg) -> Path:
    p = tmp_path / "moe.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def digest_tree(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(path).iterdir()}


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom moeforge.cli import cli\n"
        "for args in (['--help'], ['build', '--help'], ['add-expert', '--help'], ['extract', '--help']):\n"
        "    r = CliRunner().invoke(cli, args)\n    assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'pydantic', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version():
    import moeforge

    r = run("--version")
    assert r.returncode == 0 and moeforge.__version__ in r.stdout


@pytest.mark.slow
def test_build_quiet_prints_nothing_and_leaves_sources_alone(models, tmp_path):
    cfg = write_config(tmp_path, expert_config(models["base"], [models["code"], models["story"]]))
    before = {m: digest_tree(models[m]) for m in ("base", "code", "story")}
    # a real process: --quiet silences libraries (transformers' loading bars) before they are imported
    r = run_process("build", cfg, tmp_path / "out", "--quiet", "--random-seed", "1", "--out-shard-size", "50KB")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert {m: digest_tree(models[m]) for m in ("base", "code", "story")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left


def _assert_clean_failure(r, out: Path, code: int, *needles):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_unknown_key_is_a_usage_error(models, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    cfg["experts"][0]["positive_promts"] = ["typo"]
    r = run("build", write_config(tmp_path, cfg), tmp_path / "out")
    _assert_clean_failure(r, tmp_path / "out", 2, "experts.0.positive_promts", "unknown key")


def test_missing_model_directory(models, tmp_path):
    cfg = expert_config(models["base"], [models["code"], str(tmp_path / "nowhere")])
    r = run("build", write_config(tmp_path, cfg), tmp_path / "out")
    _assert_clean_failure(r, tmp_path / "out", 2, "nowhere", "no such directory")


def test_offline_hub_id_is_a_clear_error_not_a_hang(models, tmp_path):
    cfg = expert_config(models["base"], [models["code"], "nobody-xyz/not-a-real-model@main"])
    r = run("build", write_config(tmp_path, cfg), tmp_path / "out", env={"HF_HOME": str(tmp_path / "hf")})
    _assert_clean_failure(r, tmp_path / "out", 2, "nobody-xyz/not-a-real-model@main", "HF_HUB_OFFLINE")


def test_all_same_experts_need_the_flag_unless_gates_are_random(models, tmp_path):
    cfg = write_config(tmp_path, expert_config(models["base"], [models["base"]] * 2, gate_mode="cheap_embed"))
    r = run("build", cfg, tmp_path / "out")
    _assert_clean_failure(r, tmp_path / "out", 2, "--i-understand-this-is-not-useful-without-training")
    r = run("build", cfg, tmp_path / "out", "--quiet", "--i-understand-this-is-not-useful-without-training")
    assert r.returncode == 0, r.stderr
    for mode in ("random", "uniform_random"):  # as mergekit-moe: upcycling, said once
        cfg = write_config(tmp_path, expert_config(models["base"], [models["base"]] * 2, gate_mode=mode))
        r = run("build", cfg, tmp_path / mode)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("sparse upcycling") == 1 and "needs training" in r.stderr, r.stderr


def test_mismatched_expert(models, tmp_path):
    from moeforge.toy import make_dense

    make_dense(tmp_path / "wide", hidden_size=48, intermediate_size=64)
    cfg = expert_config(models["base"], [models["code"], str(tmp_path / "wide")])
    r = run("build", write_config(tmp_path, cfg), tmp_path / "out")
    _assert_clean_failure(r, tmp_path / "out", 2, "wide", "hidden_size is 48", "32")


def test_truncated_safetensors(models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["code"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = expert_config(models["base"], [models["code"], str(broken)])
    r = run("build", write_config(tmp_path, cfg), tmp_path / "out")
    _assert_clean_failure(r, tmp_path / "out", 2, "model.safetensors", "truncated")


def test_non_empty_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = write_config(tmp_path, expert_config(models["base"], [models["code"], models["story"]], gate_mode="random"))
    r = run("build", cfg, out)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "keep.txt").exists()
    r = run("build", cfg, out, "--overwrite", "--quiet")
    assert r.returncode == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_shows_info(models, tmp_path, flag):
    cfg = write_config(tmp_path, expert_config(models["base"], [models["code"], models["story"]], gate_mode="random"))
    r = run("build", cfg, tmp_path / "out", flag)
    assert r.returncode == 0 and "parameters" in r.stderr
