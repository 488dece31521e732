"""Every refusal comes before any download: sources are checked in order from configs and safetensors headers
(a Hub model's headers are read remotely), and weights are fetched only once everything passed."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import expert_config
from helpers import read_tensors

import moeforge
from moeforge.errors import ConfigError, SourceError

HUB_ID = "someone/hub-expert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(models, tmp_path, monkeypatch):
    """A fake Hub serving a copy of the `code` model: records every call, never touches the network."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from moeforge.sources.checkpoint import read_safetensors_header

    snapshot = tmp_path / "hub" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    calls = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append(("config", repo_id, revision))
        shutil.copyfile(f"{models['code']}/{filename}", snapshot / filename)
        return str(snapshot / filename)

    def get_safetensors_metadata(repo_id, revision=None, **kwargs):
        calls.append(("headers", repo_id, revision))
        refs = read_safetensors_header(Path(models["code"]) / "model.safetensors")
        start = min(r.start for r in refs.values())
        tensors = {n: TensorInfo(r.dtype, list(r.shape), (r.start - start, r.end - start)) for n, r in refs.items()}
        files = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)}
        return SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map={n: "model.safetensors" for n in refs},
                                       files_metadata=files)

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append(("weights", repo_id, revision))
        for f in Path(models["code"]).iterdir():
            shutil.copyfile(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for name, fn in (("hf_hub_download", hf_hub_download), ("get_safetensors_metadata", get_safetensors_metadata),
                     ("snapshot_download", snapshot_download)):
        monkeypatch.setattr(huggingface_hub, name, fn)
    return calls


@pytest.fixture(scope="module")
def misfits(tmp_path_factory):
    from moeforge.toy import make_dense

    root = tmp_path_factory.mktemp("misfits")
    make_dense(root / "wide", hidden_size=48)
    make_dense(root / "gemma", family="gemma")
    return {"wide": str(root / "wide"), "gemma": str(root / "gemma")}


@pytest.mark.parametrize("case", ["base refused", "earlier expert refused"])
def test_refusal_before_a_later_hub_source_is_touched(models, misfits, hub, out, case):
    if case == "base refused":
        cfg, error, needle = expert_config(misfits["gemma"], [HUB_ID, models["story"]]), ConfigError, "offset_norm"
    else:
        cfg, error, needle = expert_config(models["base"], [misfits["wide"], HUB_ID]), SourceError, "hidden_size is 48"
    with pytest.raises(error, match=needle):
        moeforge.build(cfg, out, quiet=True)
    assert hub == []
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_hub_source_is_checked_from_headers_and_never_downloaded_when_refused(models, misfits, hub, out):
    with pytest.raises(SourceError, match="hidden_size is 48"):
        moeforge.build(expert_config(models["base"], [HUB_ID, misfits["wide"]]), out, quiet=True)
    assert [c[0] for c in hub] == ["config", "headers"]  # shapes checked remotely, weights never fetched
    assert hub[1][2] == COMMIT


def test_hub_weights_are_fetched_after_the_checks_at_the_checked_commit(models, hub, out, tmp_path):
    moeforge.build(expert_config(models["base"], [HUB_ID, models["story"]], gate_mode="random"), out, quiet=True,
                   random_seed=1)
    assert hub == [("config", HUB_ID, None), ("headers", HUB_ID, COMMIT), ("weights", HUB_ID, COMMIT)]
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]], gate_mode="random"),
                   tmp_path / "local", quiet=True, random_seed=1)
    got, want = read_tensors(out), read_tensors(tmp_path / "local")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "local" / "config.json").read_text())
