"""--device and --load-in-4bit/8bit: checked before anything is written; bitsandbytes on CPU when installed."""
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import expert_config
from helpers import read_tensors

import moeforge
from moeforge.cli import cli


def _build_cli(tmp_path, cfg, *flags):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(cli, ["build", str(path), str(tmp_path / "out"), "--quiet", *flags])


def _assert_one_line(result, out, *fragments):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeforge: error:"), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--device", "gpu"], ["--device: 'gpu' is not one of cpu, cuda, cuda:N, auto"]),
    (["--device", "cuda:x"], ["--device: 'cuda:x'"]),
    (["--load-in-4bit", "--load-in-8bit"], ["choose one"]),
])
def test_bad_load_flags_fail_before_writing(models, tmp_path, flags, fragments):
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    _assert_one_line(_build_cli(tmp_path, cfg, *flags), tmp_path / "out", *fragments)


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantization_without_bitsandbytes_names_the_extra(models, tmp_path, monkeypatch, flag):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    _assert_one_line(_build_cli(tmp_path, cfg, flag), tmp_path / "out", f"{flag} needs bitsandbytes",
                     "pip install moeforge[quant]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu(models, tmp_path):
    cfg = expert_config(models["base"], [models["code"], models["story"]])
    _assert_one_line(_build_cli(tmp_path, cfg, "--device", "cuda:1"), tmp_path / "out", "no CUDA device")


def test_load_kwargs():
    from moeforge.gates.loading import load_kwargs
    from moeforge.options import BuildOptions

    kwargs = load_kwargs(BuildOptions(device="auto", hidden_dtype="float32"))
    assert kwargs["device_map"] == ("auto" if torch.cuda.is_available() else "cpu")
    assert kwargs["dtype"] is torch.float32 and "quantization_config" not in kwargs
    pytest.importorskip("bitsandbytes")
    q = load_kwargs(BuildOptions(device="cpu", load_in_4bit=True, hidden_dtype="bfloat16"))["quantization_config"]
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_compute_dtype is torch.bfloat16


def _routers(out):
    t = read_tensors(out)
    return torch.stack([t[f"model.layers.{l}.block_sparse_moe.gate.weight"] for l in range(2)])


@pytest.fixture(scope="module")
def base64(tmp_path_factory):
    """bitsandbytes' CPU 4-bit kernels need rows of at least one 64-element block."""
    from moeforge.toy import make_dense

    path = tmp_path_factory.mktemp("quant") / "base64"
    make_dense(path, seed=0, hidden_size=64, intermediate_size=128)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hidden", "fitted"])
def test_quantized_forward_pass_on_cpu_gives_nearly_the_same_gates(base64, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    cfg = expert_config(base64, [base64, base64], gate_mode=mode)  # gates depend on the base only
    opts = dict(quiet=True, hidden_dtype="float32", device="cpu", allow_all_same=True)
    moeforge.build(cfg, tmp_path / "full", **opts)
    full = _routers(tmp_path / "full")
    for flag in ("load_in_8bit", "load_in_4bit"):
        out = tmp_path / flag
        moeforge.build(cfg, out, **opts, **{flag: True})
        quant = _routers(out)
        cos = torch.nn.functional.cosine_similarity(quant, full, dim=-1)
        assert cos.min() > (0.97 if flag == "load_in_8bit" else 0.8), (flag, cos)
        assert not torch.equal(quant, full)  # the quantized model really ran


def test_inspect_help_does_not_import_heavy_modules():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom moeforge.cli import cli\n"
        "r = CliRunner().invoke(cli, ['inspect', '--help'])\nassert r.exit_code == 0, r.output\n"
        "assert '--load-in-4bit' in CliRunner().invoke(cli, ['build', '--help']).output\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
