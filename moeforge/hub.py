"""`moeforge upload`: publish an output directory on the Hugging Face Hub with huggingface_hub.

huggingface_hub 2.4 has no `upload_large_folder`, so resuming is done here: each weight file goes up in a
commit of its own, and files whose content is already on the Hub (same sha256 for LFS files, same git blob
id otherwise) are skipped. An interrupted upload resumes at the next file when the command is run again.
The small files (config, card, index, tokenizer) go last, in one commit, so the repo only looks complete
once it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union
from urllib.parse import quote

from moeforge.errors import ConfigError, MoeforgeError, SourceError
from moeforge.units import human_bytes

log = logging.getLogger("moeforge")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
OWN_COMMIT_BYTES = 10 * 1024 * 1024  # files above this (and weight files) get a commit each: the unit of resume
# Weight files transformers would pick up: an old one left in the repo could shadow or mix with the new ones.
_STALE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
DEFAULT_MESSAGE = "Upload with moeforge"


@dataclasses.dataclass(frozen=True)
class LocalFile:
    path: Path
    name: str  # path in the repo (posix)
    size: int
    data: Optional[bytes] = None  # bytes to send instead of the file's (the card with its repo id filled in)

    @property
    def own_commit(self) -> bool:
        return self.name.endswith(WEIGHT_SUFFIXES) or self.size > OWN_COMMIT_BYTES

    def content(self) -> Union[bytes, str]:
        return self.data if self.data is not None else str(self.path)


@dataclasses.dataclass
class UploadResult:
    repo_id: str
    url: str
    files: List[LocalFile]  # every local file considered
    uploaded: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)  # already on the Hub, same content
    deleted: List[str] = dataclasses.field(default_factory=list)  # stale weight files removed from the repo
    dry_run: bool = False

    def listing(self) -> str:
        """What a dry run would send, one file a line, in commit order."""
        ordered = commit_batches(self.files)
        total = sum(f.size for f in self.files)
        lines = [f"would upload {len(self.files)} file(s), {human_bytes(total)}, to {self.repo_id} in {len(ordered)} commit(s):"]
        width = max((len(f.name) for f in self.files), default=0)
        for i, batch in enumerate(ordered, 1):
            for f in batch:
                note = "  (model id filled in)" if f.data is not None else ""
                lines.append(f"  {f.name:<{width}}  {human_bytes(f.size):>9}  commit {i}{note}")
        lines.append("files already on the Hub with the same content are skipped")
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    if "@" in repo_id:
        raise ConfigError(f"{repo_id}: a repo id has no @revision; pass --revision BRANCH")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or len(repo_id) > 96:
        raise ConfigError(f"{repo_id}: not a Hub repo id (expected org/name: letters, digits, '-', '_', '.')")


def require_token() -> str:
    """The token for writing to the Hub (HF_TOKEN or the saved login), or a one-line error."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise MoeforgeError("HF_HUB_OFFLINE is set: unset it to upload to the Hub")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MoeforgeError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`; nothing was uploaded")
    return token


def local_files(out: Path, repo_id: str) -> List[LocalFile]:
    """Every file to send, after checking that `out` is a checkpoint that can be loaded once uploaded."""
    out = Path(out)
    if not out.exists():
        raise ConfigError(f"{out}: no such directory")
    if not out.is_dir():
        raise ConfigError(f"{out}: is a file; upload takes a model directory")
    if ".moeforge-tmp-" in out.name:
        raise SourceError(f"{out}: is an unfinished moeforge build (a temporary directory)")
    files = sorted(
        (p for p in out.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)),
        key=lambda p: p.relative_to(out).as_posix(),
    )
    names = {p.relative_to(out).as_posix() for p in files}
    _check_checkpoint(out, names)
    result = []
    for p in files:
        name = p.relative_to(out).as_posix()
        data = _card_bytes(p, repo_id) if name == "README.md" else None
        result.append(LocalFile(p, name, len(data) if data is not None else p.stat().st_size, data))
    return result


def commit_batches(files: Sequence[LocalFile]) -> List[List[LocalFile]]:
    """One commit per weight or large file, then one for all the small files."""
    big = [[f] for f in files if f.own_commit]
    small = [f for f in files if not f.own_commit]
    return big + ([small] if small else [])


def upload(
    out: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
    token: Optional[str] = None,
) -> UploadResult:
    """Create `repo_id` if needed and upload `out` to it (resumable). Checks everything before sending anything."""
    check_repo_id(repo_id)
    revision = None if revision in (None, "", "main") else revision
    files = local_files(Path(out), repo_id)
    if dry_run:
        from huggingface_hub import constants

        return UploadResult(repo_id, _url(f"{constants.ENDPOINT}/{repo_id}", revision), files, dry_run=True)
    token = token or require_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or DEFAULT_MESSAGE
    with _hub_errors(repo_id, "preparing the upload"):
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        repo_id = repo_url.repo_id or repo_id
        if private and not api.repo_info(repo_id).private:
            raise ConfigError(f"{repo_id}: --private, but the repo already exists and is public; nothing was uploaded")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = _remote_files(api, repo_id, revision)
    result = UploadResult(repo_id, _url(str(repo_url).rstrip("/"), revision), files)
    todo = []
    for f in files:
        if _same_content(f, remote.get(f.name)):
            result.skipped.append(f.name)
        else:
            todo.append(f)
    local_names = {f.name for f in files}
    result.deleted = sorted(p for p in remote if _STALE.match(p) and p not in local_names)
    if result.skipped:
        log.info("%d file(s) already on the Hub with the same content: skipped", len(result.skipped))
    batches = commit_batches(todo)
    if not batches and result.deleted:
        batches = [[]]
    for i, batch in enumerate(batches, 1):
        last = i == len(batches)
        _commit(api, repo_id, revision, batch, result.deleted if last else [],
                message if last else f"{message} ({batch[0].name})", result, len(files))
    if not batches:
        log.info("%s is already up to date", repo_id)
    return result


def push_build(out: Path, repo_id: str, *, private: bool, token: Optional[str]) -> str:
    """`build --push-to-hub`: the build is done and kept whatever happens here."""
    try:
        return upload(out, repo_id, private=private, token=token).url
    except MoeforgeError as e:
        raise type(e)(f"built {out}, but the upload failed: {e} (retry with: moeforge upload {out} {repo_id})") from None


def _commit(api, repo_id, revision, batch, deletions, message, result, total) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=f.content()) for f in batch]
    ops += [CommitOperationDelete(path_in_repo=p) for p in deletions]
    names = ", ".join(f.name for f in batch) if len(batch) <= 3 else f"{len(batch)} files"
    log.info("uploading %s%s", names or "deletions", f" and removing {len(deletions)} stale file(s)" if deletions else "")
    done = len(result.skipped) + len(result.uploaded)
    with _hub_errors(repo_id, f"uploading {batch[0].name if batch else 'deletions'}", done, total):
        api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    result.uploaded += [f.name for f in batch]


def _remote_files(api, repo_id: str, revision: Optional[str]) -> Dict[str, object]:
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(f, RepoFile)}
    except (EntryNotFoundError, RevisionNotFoundError):  # a repo with no commit yet
        return {}


def _same_content(local: LocalFile, remote) -> bool:
    """Whether the Hub already has these bytes at this path: sha256 for LFS files, git blob id otherwise."""
    if remote is None or remote.size is None:
        return False
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        if lfs.size != local.size:
            return False
        if local.data is not None:
            import hashlib

            return hashlib.sha256(local.data).hexdigest() == lfs.sha256
        with open(local.path, "rb") as fh:
            return sha_fileobj(fh).hex() == lfs.sha256
    if remote.size != local.size:
        return False
    data = local.data if local.data is not None else local.path.read_bytes()
    return git_hash(data) == remote.blob_id


def _check_checkpoint(out: Path, names: set) -> None:
    """A Hugging Face checkpoint (config.json and weights) or a moeforge export (its card and weights)."""
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise SourceError(f"{out}: no weight files (*.safetensors, *.bin); not a model checkpoint")
    if "config.json" not in names and not _is_moeforge_card(out / "README.md"):
        raise SourceError(f"{out}: no config.json; not a Hugging Face or moeforge checkpoint")
    for index in (n for n in names if n.endswith(".index.json")):
        try:
            listed = set(json.loads((out / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SourceError(f"{out / index}: unreadable weight index") from None
        parent = index.rpartition("/")[0]
        missing = sorted(f for f in listed if (f"{parent}/{f}" if parent else f) not in names)
        if missing:
            raise SourceError(f"{out}: {index} lists {missing[0]}, which is missing (incomplete checkpoint)")


def _is_moeforge_card(path: Path) -> bool:
    if not path.is_file():
        return False
    from huggingface_hub import metadata_load

    try:
        return "moeforge" in ((metadata_load(path) or {}).get("tags") or [])
    except Exception:
        return False


def _card_bytes(path: Path, repo_id: str) -> Optional[bytes]:
    """A moeforge card with its usage snippet pointing at the repo, else None (sent as it is)."""
    if not _is_moeforge_card(path):
        return None
    from moeforge.card import fill_model_id

    text = path.read_text(encoding="utf-8")
    filled = fill_model_id(text, repo_id)
    return filled.encode("utf-8") if filled != text else None


@contextlib.contextmanager
def _hub_errors(repo_id: str, doing: str, done: Optional[int] = None, total: Optional[int] = None):
    """Hub and network failures as one line; mid-upload, how far it got and how to resume."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except MoeforgeError:
        raise
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = {
            401: "the token was rejected (check HF_TOKEN or `hf auth login`)",
            403: f"this token may not write to {repo_id.split('/')[0]} (it needs write access)",
        }.get(status) or f"the Hub answered {status or 'an error'}: {_first_line(e.server_message or str(e))}"
        raise MoeforgeError(f"{repo_id}: {doing}: {why}{_resume(done, total)}") from None
    except _network_errors() as e:
        why = f"cannot reach the Hub ({_first_line(str(e)) or type(e).__name__})"
        raise MoeforgeError(f"{repo_id}: {doing}: {why}{_resume(done, total)}") from None


def _resume(done: Optional[int], total: Optional[int]) -> str:
    if total is None:
        return ""
    return f"; {done} of {total} files are on the Hub: run the same command again to resume"


def _network_errors() -> tuple:
    """Exception bases of huggingface_hub's transport: httpx2 (2.x), httpx (1.x) or requests (older)."""
    bases = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            bases.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(bases)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _url(base: str, revision: Optional[str]) -> str:
    return f"{base}/tree/{quote(revision, safe='')}" if revision else base
