"""`moeforge upload` and `build --push-to-hub` through the real huggingface_hub client.

The Hub is `hub_server.LocalHub`, an HTTP server on 127.0.0.1 that huggingface_hub is pointed at
(HF_ENDPOINT): the client's own requests (create repo, tree listing, preupload, LFS batch and PUT, the
ndjson commit) reach it, and it keeps what it receives. So the tests check what ends up in the repo, byte
for byte, and resume from the LFS metadata the server lists. Xet storage is switched off
(HF_HUB_DISABLE_XET): huggingface_hub then takes the git LFS path, which is what a local server can offer.
"""
import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import expert_config
from hub_server import LocalHub
from run_cli import run


@pytest.fixture(scope="module")
def built(models, tmp_path_factory) -> Path:
    """A real build with four weight shards."""
    import moeforge

    out = tmp_path_factory.mktemp("upload") / "moe"
    moeforge.build(expert_config(models["base"], [models["code"], models["story"]]), out, random_seed=0,
                   out_shard_size="60KB", quiet=True)
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path) -> LocalHub:
    """A local Hub; huggingface_hub online and pointed at it; no token unless a test sets one."""
    import huggingface_hub.constants as constants

    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf" / "agent_harnesses.json"))
    with LocalHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # read at import time by huggingface_hub
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield server
        assert server.unexpected == [], "the client called endpoints the local Hub does not serve"


def local_tree(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def shard_names(out: Path) -> list:
    return sorted(p.name for p in out.glob("*.safetensors"))


def one_line_error(r, code: int = 1) -> str:
    """The error: one line on stderr (after any progress lines), no traceback."""
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    return errors[0]


def test_upload_sends_every_file_to_the_named_repo_branch_and_visibility(built, hub, monkeypatch):
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    result = upload(built, "me/tiny-moe", private=True, revision="exp", commit_message="first try")
    assert result.url == f"{hub.url}/me/tiny-moe/tree/exp"
    assert hub.repos["me/tiny-moe"].private is True
    assert hub.tokens() == {"hf_from_env"}
    shards = shard_names(built)
    assert len(shards) == 4
    commits = hub.commits("me/tiny-moe")
    assert {c["branch"] for c in commits} == {"exp"}
    # one commit per shard (the unit of resume), each an LFS file, then the small files with the user's message
    assert [c["ops"] for c in commits[:4]] == [[("lfsFile", s)] for s in shards]
    assert commits[-1]["summary"] == "first try" and len(commits) == 5
    assert len(hub.sent("PUT", "^/__lfs/")) == 4  # the shards' bytes went through the LFS object store
    stored = hub.stored("me/tiny-moe", "exp")
    assert all(stored[s].lfs for s in shards) and not stored["config.json"].lfs
    remote = hub.files("me/tiny-moe", "exp")
    assert remote.pop(".gitattributes")
    local = local_tree(built)
    card = remote.pop("README.md").decode()
    assert 'model_id = "me/tiny-moe"' in card  # the snippet points at the repo; the local card is untouched
    assert card.replace("me/tiny-moe", "path/to/this/model") == local.pop("README.md").decode()
    assert "moeforge_manifest.json" in remote
    assert remote == local  # byte for byte
    assert set(hub.files("me/tiny-moe", "main")) == {".gitattributes"}


def test_second_upload_skips_what_the_hub_has(built, hub, monkeypatch, tmp_path):
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    upload(built, "me/again")
    hub.requests.clear()
    again = upload(built, "me/again")  # the listing's LFS sha256 and blob ids match: nothing to send
    assert sorted(again.skipped) == sorted(f.name for f in again.files) and again.uploaded == []
    assert hub.sent("POST", "/preupload/|/commit/|/lfs/") == [] and hub.sent("PUT", ".") == []
    assert len(hub.commits("me/again")) == 5
    changed = tmp_path / "changed"
    shutil.copytree(built, changed)
    shard = changed / shard_names(built)[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, other sha256
    shard.write_bytes(bytes(data))
    hub.requests.clear()
    result = upload(changed, "me/again")
    assert result.uploaded == [shard.name] and len(hub.sent("PUT", "^/__lfs/")) == 1
    assert hub.files("me/again")[shard.name] == bytes(data)


def test_interrupted_upload_resumes_without_resending(built, hub, monkeypatch):
    from moeforge.errors import MoeforgeError
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    shards = shard_names(built)
    hub.fail("POST", "/commit/main$", 500, "Internal Error", body=shards[2])
    with pytest.raises(MoeforgeError) as e:
        upload(built, "me/resume")
    message = str(e.value)
    total = len(list(built.iterdir()))
    assert "the Hub answered 500: Internal Error" in message and f"2 of {total} files are on the Hub" in message
    assert "run the same command again to resume" in message and "\n" not in message
    assert set(hub.files("me/resume")) == {".gitattributes", shards[0], shards[1]}
    hub.requests.clear()
    result = upload(built, "me/resume")
    assert sorted(result.skipped) == shards[:2]
    assert result.uploaded[:2] == shards[2:]
    committed = [path for c in hub.commits("me/resume") for _, path in c["ops"]]
    assert committed.count(shards[0]) == 1 and committed.count(shards[2]) == 1
    remote = hub.files("me/resume")
    assert all(remote[s] == (built / s).read_bytes() for s in shards)


def test_dropped_connection_is_one_line_with_how_to_resume(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    hub.fail("POST", "/commit/main$", None, times=5, body=shard_names(built)[1])
    err = one_line_error(run("upload", built, "me/drop"))
    assert "cannot reach the Hub" in err and f"1 of {len(list(built.iterdir()))} files are on the Hub" in err


def test_changed_or_stale_files_are_replaced(built, hub, monkeypatch):
    from moeforge.hub import upload

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    shard = shard_names(built)[0]
    hub.add_repo("me/old", files={shard: b"older bytes of another size", "model.safetensors": b"old single file",
                                  "model-00009-of-00009.safetensors": b"old", "notes.md": b"kept",
                                  "training_args.bin": b"kept too"})
    result = upload(built, "me/old")
    files = hub.files("me/old")
    assert files[shard] == (built / shard).read_bytes()
    assert result.deleted == ["model-00009-of-00009.safetensors", "model.safetensors"]
    assert "model.safetensors" not in files and files["notes.md"] == b"kept"  # only stale weights go
    assert files["training_args.bin"] == b"kept too"
    last = hub.commits("me/old")[-1]["ops"]
    assert {path for key, path in last if key == "deletedFile"} == set(result.deleted)


def test_token_from_saved_login(built, hub):
    import huggingface_hub.constants as constants

    from moeforge.hub import upload

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_saved_login")
    upload(built, "me/saved")
    assert hub.tokens() == {"hf_saved_login"}


def test_no_token_is_one_line_and_sends_nothing(built, hub):
    err = one_line_error(run("upload", built, "me/x"))
    assert "no Hugging Face token" in err and "HF_TOKEN" in err
    assert hub.requests == []


def test_offline_mode_is_refused_before_sending(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in one_line_error(run("upload", built, "me/x")) and hub.requests == []


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
    assert needle in one_line_error(run("upload", _not_a_checkpoint(tmp_path, built, kind), "me/x"), code)
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["no-slash", "me/x@dev", "a/b/c", "me/bad name"])
def test_bad_repo_id_sends_nothing(built, hub, monkeypatch, repo):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert repo in one_line_error(run("upload", built, repo), 2) and hub.requests == []


def test_private_on_an_existing_public_repo_is_refused(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    hub.add_repo("me/public")
    assert "is public" in one_line_error(run("upload", built, "me/public", "--private"), 2)
    assert hub.commits("me/public") == [] and set(hub.files("me/public")) == {".gitattributes"}


def test_rejected_token_is_one_line(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    hub.rejected_tokens.add("hf_bad")
    assert "token was rejected" in one_line_error(run("upload", built, "me/x"))
    assert "me/x" not in hub.repos


def test_namespace_without_write_access_is_one_line(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert "may not write to someone" in one_line_error(run("upload", built, "someone/x"))


def test_repo_gone_mid_upload_is_one_line(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    hub.fail("POST", "/preupload/", 404, "Repository not found", code="RepoNotFound")
    err = one_line_error(run("upload", built, "me/gone"))
    assert "me/gone" in err and "404" in err and f"0 of {len(list(built.iterdir()))} files" in err


def test_server_error_is_one_line(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    hub.fail("POST", "/api/repos/create", 500, "Internal Error")
    err = one_line_error(run("upload", built, "me/x"))
    assert "preparing the upload: the Hub answered 500: Internal Error" in err


def test_dry_run_lists_files_and_contacts_nothing(built, hub):
    r = run("upload", built, "me/dry", "--dry-run")  # no token needed: nothing is sent
    assert r.returncode == 0, r.stderr
    assert hub.requests == []
    lines = r.stdout.splitlines()
    assert "me/dry" in lines[0] and "5 commit(s)" in lines[0]
    for p in built.iterdir():
        assert any(line.strip().startswith(p.name + " ") for line in lines), p.name
    assert any("README.md" in line and "model id filled in" in line for line in lines)


def test_cli_upload_prints_the_url(built, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    r = run("upload", built, "me/cli", "--revision", "v1", "--commit-message", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{hub.url}/me/cli/tree/v1"
    assert hub.commits("me/cli")[-1]["summary"] == "hello" and hub.commits("me/cli")[-1]["branch"] == "v1"
    assert "uploaded" in r.stderr


def test_build_push_to_hub(models, hub, monkeypatch, tmp_path):
    import moeforge

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    cfg = expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")
    result = moeforge.build(cfg, tmp_path / "out", random_seed=0, quiet=True, push_to_hub="me/pushed", private=True)
    assert result.hub_url == f"{hub.url}/me/pushed"
    assert hub.repos["me/pushed"].private is True
    local = local_tree(tmp_path / "out")
    assert 'model_id = "me/pushed"' in local["README.md"].decode()  # known at build time: card already right
    remote = hub.files("me/pushed")
    remote.pop(".gitattributes")
    assert {k: hashlib.sha256(v).hexdigest() for k, v in remote.items()} == {
        k: hashlib.sha256(v).hexdigest() for k, v in local.items()}


def test_build_push_without_token_fails_before_building(models, hub, tmp_path):
    import yaml

    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(expert_config(models["base"], [models["code"], models["story"]], gate_mode="random")))
    assert "no Hugging Face token" in one_line_error(run("build", cfg, tmp_path / "out", "--push-to-hub", "me/x", "--quiet"))
    assert not (tmp_path / "out").exists() and hub.requests == []
    r = run("build", cfg, tmp_path / "out", "--private", "--quiet")
    assert r.returncode == 2 and "--push-to-hub" in r.stderr and not (tmp_path / "out").exists()
