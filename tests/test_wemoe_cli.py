"""`moeforge wemoe` on the command line: run, eval (with a saved `datasets` dataset), one-line errors, fast help."""
import json
import subprocess
import sys

import pytest
import yaml
from run_cli import run, run_process


def test_wemoe_help_does_not_import_heavy_modules():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom moeforge.cli import cli\n"
        "for args in (['wemoe', '--help'], ['wemoe', 'run', '--help'], ['wemoe', 'eval', '--help']):\n"
        "    r = CliRunner().invoke(cli, args)\n    assert r.exit_code == 0, r.output\n"
        "    assert 'Usage' in r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'pydantic') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    import torch

    from moeforge.wemoe.toy import make_clip_tasks

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("cli")
        cfg = make_clip_tasks(root, pretrain_steps=20, finetune_steps=20)
    finally:
        torch.set_num_threads(before)
    cfg["tta"] = {"lr": 1e-3, "batch_size": 8}
    path = root / "wemoe.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.slow
def test_run_then_eval_with_a_saved_dataset(tiny_tasks, tmp_path):
    import datasets
    from PIL import Image

    from moeforge.wemoe.toy import TASKS, make_images

    cfg_path, cfg = tiny_tasks
    out = tmp_path / "out"
    # a real process: --quiet silences libraries (transformers' loading bars) before they are imported
    r = run_process("wemoe", cfg_path, out, "--max-steps", "3", "--seed", "7", "--device", "cpu", "--quiet",
                    env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    meta = json.loads((out / "wemoe.json").read_text())
    assert meta["config"]["seed"] == 7 and meta["tta"]["steps"] == 3 and len(meta["tta"]["curve"]) == 3

    images = make_images("colors", 12, seed=99)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TASKS["colors"][0])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a, _ in images],
                                     "label": [lab for _, lab in images]}, features=features)
    ds.save_to_disk(str(tmp_path / "colors-ds"))
    from click.testing import CliRunner

    from moeforge.cli import cli

    # in-process (the imports are loaded already): the same command line, parsed and printed by click
    r = CliRunner().invoke(cli, ["wemoe", "eval", str(out), "--data", f"colors={tmp_path / 'colors-ds'}",
                                 "--json", str(tmp_path / "acc.json"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "| method | colors | quadrant | mean |"
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["pretrained", "fine-tuned (own task)", "task arithmetic",
                                                           "WEMoE"]
    report = json.loads((tmp_path / "acc.json").read_text())
    assert report["scored"] == {"colors": 12, "quadrant": 96}
    assert set(report["accuracy"]) == {"pretrained", "fine-tuned (own task)", "task arithmetic", "WEMoE"}


def _one_line_failure(r, code, *needles):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors(tiny_tasks, tmp_path):
    cfg_path, cfg = tiny_tasks
    bad = {**cfg, "tta": {"learning_rate": 1e-3}}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    r = run("wemoe", tmp_path / "bad.yml", tmp_path / "out")
    _one_line_failure(r, 2, "tta.learning_rate", "unknown key")

    stray = {**cfg, "experts": [dict(cfg["experts"][0], data=str(tmp_path / "nowhere")), cfg["experts"][1]]}
    (tmp_path / "stray.yml").write_text(yaml.safe_dump(stray))
    r = run("wemoe", tmp_path / "stray.yml", tmp_path / "out", "--device", "cpu")
    _one_line_failure(r, 2, "experts.0.data", "nowhere")
    assert not (tmp_path / "out").exists()

    r = run("wemoe", "eval", tmp_path)
    _one_line_failure(r, 2, "wemoe.json", "missing")
