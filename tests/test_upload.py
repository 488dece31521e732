"""`moeforge upload` and `build --push-to-hub`, against huggingface_hub's client API with the Hub faked.

Limit, honestly: tests cannot reach the Hub. `hub_fakes.FakeHub` substitutes the network side of the
HfApi methods moeforge calls (create_repo, repo_info, create_branch, list_repo_tree, create_commit) in
this process; the rest is the real huggingface_hub (HfApi, get_token, CommitOperation*, RepoFile, RepoUrl),
and every call is checked against the real method's signature. So these tests show which repo, files,
branch, visibility and token moeforge sends, that it sends nothing on errors, and how it resumes; they
cannot show that the real Hub accepts the upload (authentication, LFS/Xet transfer, rate limits).
"""
import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import expert_config
from hub_fakes import FakeHub


@pytest.fixture(scope="module")
def built(models, tmp_path_factory) -> Path:
    """A real build with four weight shards."""
    import moeforge

    out = tmp_path_factory.mktemp("upload") / "moe"
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, random_seed=0,
                   out_shard_size="60KB", quiet=True)
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    """The fake Hub, online mode for moeforge's own check, and no token unless a test sets one."""
    import huggingface_hub.constants as constants

    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    return FakeHub().install(monkeypatch)


def local_tree(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def cli(*args):
    """Run the CLI in this process (so the fake Hub is in place), restoring the logger it reconfigures."""
    import logging

    from moeforge.cli import cli as group

    logger = logging.getLogger("moeforge")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        return CliRunner().invoke(group, [str(a) for a in args])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_upload_sends_every_file_to_the_named_repo_branch_and_visibility(built, hub, monkeypatch):
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    result = upload(built, "me/tiny-moe", private=True, revision="exp", commit_message="first try")
    assert result.url == "https://huggingface.co/me/tiny-moe/tree/exp"
    create = hub.calls[0]
    assert create[0] == "create_repo" and create[1]["repo_id"] == "me/tiny-moe" and create[1]["private"] is True
    assert {c[2] for c in hub.calls} == {"hf_from_env"}  # the token from HF_TOKEN, on every call
    assert hub.repos["me/tiny-moe"]["private"] is True
    commits = hub.commits()
    assert {c["revision"] for c in commits} == {"exp"} and {c["repo_id"] for c in commits} == {"me/tiny-moe"}
    shards = sorted(p.name for p in built.glob("*.safetensors"))
    assert len(shards) == 4
    # one commit per shard (the unit of resume), then the small files with the user's message
    assert [[op.path_in_repo for op in c["operations"]] for c in commits[:4]] == [[s] for s in shards]
    assert commits[-1]["commit_message"] == "first try" and len(commits) == 5
    remote = dict(hub.files("me/tiny-moe", "exp"))
    assert remote.pop(".gitattributes")
    local = local_tree(built)
    card = remote.pop("README.md").decode()
    assert 'model_id = "me/tiny-moe"' in card  # the snippet points at the repo; the local card is untouched
    assert card.replace("me/tiny-moe", "path/to/this/model") == local.pop("README.md").decode()
    assert remote == local
    assert "main" in hub.repos["me/tiny-moe"]["branches"] and len(hub.files("me/tiny-moe")) == 1


def test_interrupted_upload_resumes_without_resending(built, hub, monkeypatch):
    import httpx2

    from moeforge.errors import MoeforgeError
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    shards = sorted(p.name for p in built.glob("*.safetensors"))
    hub.fail = (shards[2], httpx2.ConnectError("connection reset by peer"))
    with pytest.raises(MoeforgeError) as e:
        upload(built, "me/resume")
    assert "cannot reach the Hub" in str(e.value) and "run the same command again to resume" in str(e.value)
    assert "2 of" in str(e.value) and "\n" not in str(e.value)
    assert set(hub.files("me/resume")) == {".gitattributes", shards[0], shards[1]}
    hub.calls.clear()
    result = upload(built, "me/resume")
    sent = [op.path_in_repo for c in hub.commits() for op in c["operations"]]
    assert shards[0] not in sent and shards[1] not in sent and shards[2] in sent and shards[3] in sent
    assert sorted(result.skipped) == shards[:2]
    hub.calls.clear()
    again = upload(built, "me/resume")  # everything is there: no commit at all
    assert hub.commits() == [] and len(again.skipped) == len(again.files)


def test_changed_or_stale_files_are_replaced(built, hub, monkeypatch):
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    shard = sorted(p.name for p in built.glob("*.safetensors"))[0]
    hub.add_repo("me/old", files={shard: b"older bytes of another size", "model.safetensors": b"old single file",
                                  "model-00009-of-00009.safetensors": b"old", "notes.md": b"kept",
                                  "training_args.bin": b"kept too"})
    result = upload(built, "me/old")
    files = hub.files("me/old")
    assert files[shard] == (built / shard).read_bytes()
    assert result.deleted == ["model-00009-of-00009.safetensors", "model.safetensors"]
    assert "model.safetensors" not in files and files["notes.md"] == b"kept"  # only stale weights go
    assert files["training_args.bin"] == b"kept too"
    last = hub.commits()[-1]["operations"]
    assert {op.path_in_repo for op in last if type(op).__name__ == "CommitOperationDelete"} == set(result.deleted)


def test_token_from_saved_login(built, hub, tmp_path):
    import huggingface_hub.constants as constants

    from moeforge.hub import upload

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_saved_login")
    upload(built, "me/saved")
    assert {c[2] for c in hub.calls} == {"hf_saved_login"}


def test_no_token_is_one_line_and_sends_nothing(built, hub, tmp_path):
    r = cli("upload", built, "me/x")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().count("\n") == 0 and "no Hugging Face token" in r.stderr and "HF_TOKEN" in r.stderr
    assert hub.calls == []


def test_offline_mode_is_refused_before_sending(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("upload", built, "me/x")
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.stderr and hub.calls == []


def _not_a_checkpoint(tmp_path, built, kind) -> Path:
    import shutil

    bad = tmp_path / kind
    if kind == "missing":
        return bad
    if kind == "file":
        bad.write_text("x")
        return bad
    if kind == "tmp":
        bad = tmp_path / ".moe.moeforge-tmp-abc"
        shutil.copytree(built, bad)
        return bad
    shutil.copytree(built, bad)
    if kind == "no-weights":
        for p in bad.glob("*.safetensors"):
            p.unlink()
    elif kind == "no-config":
        (bad / "config.json").unlink()
        (bad / "README.md").unlink()
    elif kind == "missing-shard":
        sorted(bad.glob("*.safetensors"))[1].unlink()
    return bad


@pytest.mark.parametrize("kind,code,needle", [
    ("missing", 2, "no such directory"), ("file", 2, "is a file"), ("tmp", 2, "unfinished moeforge build"),
    ("no-weights", 2, "no weight files"), ("no-config", 2, "no config.json"),
    ("missing-shard", 2, "incomplete checkpoint"),
])
def test_bad_out_is_one_line_and_sends_nothing(built, hub, monkeypatch, tmp_path, kind, code, needle):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = cli("upload", _not_a_checkpoint(tmp_path, built, kind), "me/x")
    assert r.exit_code == code, r.output
    assert needle in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert hub.calls == []


@pytest.mark.parametrize("repo", ["no-slash", "me/x@dev", "a/b/c", "me/bad name"])
def test_bad_repo_id_sends_nothing(built, hub, monkeypatch, repo):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = cli("upload", built, repo)
    assert r.exit_code == 2 and repo in r.stderr and hub.calls == []


def test_private_on_an_existing_public_repo_is_refused(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    hub.add_repo("me/public")
    r = cli("upload", built, "me/public", "--private")
    assert r.exit_code == 2 and "is public" in r.stderr
    assert "create_commit" not in hub.names() and set(hub.files("me/public")) == {".gitattributes"}


def test_rejected_token_is_one_line(built, hub, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))

    def refuse(*args, **kwargs):
        raise HfHubHTTPError("401 Client Error: Unauthorized\nmore details", response=response)

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", refuse)
    r = cli("upload", built, "me/x")
    assert r.exit_code == 1 and "token was rejected" in r.stderr and r.stderr.strip().count("\n") == 0


def test_dry_run_lists_files_and_contacts_nothing(built, hub):
    r = cli("upload", built, "me/dry", "--dry-run")  # no token needed: nothing is sent
    assert r.exit_code == 0, r.output
    assert hub.calls == []
    lines = r.stdout.splitlines()
    assert "me/dry" in lines[0] and "5 commit(s)" in lines[0]
    for p in built.iterdir():
        assert any(line.strip().startswith(p.name + " ") for line in lines), p.name
    assert any("README.md" in line and "model id filled in" in line for line in lines)


def test_cli_upload_prints_the_url(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = cli("upload", built, "me/cli", "--revision", "v1", "--commit-message", "hello")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == "https://huggingface.co/me/cli/tree/v1"
    assert hub.commits()[-1]["commit_message"] == "hello" and hub.commits()[-1]["revision"] == "v1"
    assert "uploaded" in r.stderr


def test_build_push_to_hub(models, hub, monkeypatch, tmp_path):
    import moeforge

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    result = moeforge.build(cfg, tmp_path / "out", random_seed=0, quiet=True, push_to_hub="me/pushed", private=True)
    assert result.hub_url == "https://huggingface.co/me/pushed"
    assert hub.repos["me/pushed"]["private"] is True
    local = local_tree(tmp_path / "out")
    assert 'model_id = "me/pushed"' in local["README.md"].decode()  # known at build time: card already right
    remote = dict(hub.files("me/pushed"))
    remote.pop(".gitattributes")
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items()} == {
        k: hashlib.sha256(v).hexdigest() for k, v in local.items()}


def test_build_push_without_token_fails_before_building(models, hub, tmp_path):
    import yaml

    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")))
    r = cli("build", cfg, tmp_path / "out", "--push-to-hub", "me/x", "--quiet")
    assert r.exit_code == 1 and "no Hugging Face token" in r.stderr
    assert not (tmp_path / "out").exists() and hub.calls == []
    r = cli("build", cfg, tmp_path / "out", "--private", "--quiet")
    assert r.exit_code == 2 and "--push-to-hub" in r.stderr and not (tmp_path / "out").exists()
