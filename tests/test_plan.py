"""`moeforge plan` / `build --dry-run`: checked and sized from headers alone, and what it says is what build writes."""
import json
import subprocess
import sys

import pytest
import yaml
from conftest import expert_config
from run_cli import run

import moeforge


def test_plan_matches_what_build_writes(models, out):
    cfg = expert_config(models["base"], [models["code"], models["story"], models["base"]], gate_mode="cheap_embed",
                        experts_per_token=1)
    report = moeforge.dry_run(cfg, out, out_shard_size="30KB")
    assert not out.exists()
    result = moeforge.build(cfg, out, out_shard_size="30KB", quiet=True)
    assert (report.total_params, report.active_params) == (result.total_params, result.active_params)
    assert report.active_params < report.total_params
    assert [s.name for s in report.shards] == result.files and len(result.files) > 1
    assert [s.nbytes for s in report.shards] == [(out / f).stat().st_size for f in result.files]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert [s.tensors for s in report.shards] == [list(index["weight_map"].values()).count(f) for f in result.files]
    written = sum(p.stat().st_size for p in out.iterdir())
    assert report.output_bytes >= written
    assert report.copied_bytes + report.converted_bytes + report.computed_bytes == index["metadata"]["total_size"]
    assert report.disk_free is not None and report.disk_ok


@pytest.mark.parametrize("architecture", ["mixtral", "qwen", "granite"])  # qwen: zero biases; granite: fused experts
def test_plan_reads_no_tensor_data_and_imports_no_torch(models, tmp_path, architecture):
    """Planning touches headers only: no gate is computed, no tensor data is read, and neither torch nor
    transformers is imported (routers and zero fills are planned by shape)."""
    cfg = tmp_path / "moe.yml"
    shared = {"qwen": [{"source_model": models["base"], "positive_prompts": ["hello"]}],
              "granite": [{"source_model": models["base"]}, {"source_model": models["story"]}]}.get(architecture, [])
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]], gate_mode="hidden",
                                                architecture=architecture, shared_experts=shared)))
    code = (
        "import sys, moeforge.builder as b, moeforge.gates as g, moeforge.sources.checkpoint as c\n"
        "def boom(*a, **k): raise AssertionError('computed routers or read tensor data')\n"
        "g.compute_gates = boom\n"
        "c.Checkpoint.load = c.Checkpoint.load_rows = boom\n"
        f"r = b.dry_run({str(cfg)!r})\n"
        "assert r.total_params > 0 and r.memory['base model forward'] > 0\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plan_command_prints_the_plan(models, tmp_path):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]], dtype="bfloat16")))
    r = run("plan", cfg, tmp_path / "out", "--out-shard-size", "30KB")
    assert r.returncode == 0, r.stderr
    for needle in ("parameters", "active per token", "model-00001-of-", "peak memory", "estimated", "needed", "free at",
                   "converted"):
        assert needle in r.stdout, (needle, r.stdout)
    assert not (tmp_path / "out").exists()


def test_build_dry_run_writes_nothing_and_checks_out(models, tmp_path):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]])))
    r = run("build", cfg, tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = run("build", cfg, tmp_path / "out", "--dry-run")
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_plan_rejects_bad_sources_in_one_line(models, tmp_path):
    """A truncated expert fails the plan from its header alone, with nothing written."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["story"], broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], str(broken)])))
    r = run("plan", cfg)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "truncated" in lines[0], r.stderr


def test_prompt_gates_need_a_tokenizer_before_anything_is_written(models, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(models["base"], bare)
    for p in bare.glob("*token*"):
        p.unlink()
    cfg = expert_config(str(bare), [models["code"], models["story"]], gate_mode="cheap_embed")
    with pytest.raises(moeforge.MoeforgeError, match="tokenizer"):
        moeforge.dry_run(cfg)
    # random gates need none
    assert moeforge.dry_run({**cfg, "gate_mode": "random"}).total_params > 0


def test_not_enough_disk_stops_build_and_plan(models, out, monkeypatch, tmp_path):
    import moeforge.checks.disk as disk

    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    with pytest.raises(moeforge.MoeforgeError, match="not enough free disk"):
        moeforge.build(cfg, out, quiet=True)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert not moeforge.dry_run(cfg, out).disk_ok


def test_plan_and_build_help_are_fast_and_light():
    code = (
        "import sys, time\nfrom click.testing import CliRunner\nfrom moeforge.cli import cli\n"
        "for args in (['plan', '--help'], ['build', '--help']):\n"
        "    r = CliRunner().invoke(cli, args)\n    assert r.exit_code == 0, r.output\n"
        "assert '--dry-run' in CliRunner().invoke(cli, ['build', '--help']).output\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'pydantic') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
