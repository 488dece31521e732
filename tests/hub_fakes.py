"""Stand-ins for the Hugging Face Hub, which tests cannot reach.

`FakeHub` replaces the HTTP side of a few `huggingface_hub.HfApi` methods with an in-memory store of repos.
Everything else is the real library: moeforge builds a real `HfApi`, real `CommitOperationAdd` /
`CommitOperationDelete` objects and parses real `RepoFile` / `RepoUrl` / `ModelInfo` objects, and every
call is first bound against the real method's signature, so a call the real client would reject fails here
too. What this cannot check: the Hub's own server-side behaviour (authentication, LFS/Xet transfer, rate
limits, how it answers a given request). Any other HfApi method would hit the network, which the tests
forbid (HF_HUB_OFFLINE=1 when huggingface_hub was imported), so an unexpected call fails loudly.

`hub_cache` lays out models as huggingface_hub's cache does, so Hub ids resolve offline.
"""
import hashlib
import inspect
import shutil
from pathlib import Path

PATCHED = ("create_repo", "repo_info", "create_branch", "list_repo_tree", "create_commit")


def hub_cache(root: Path, repo_id: str, model_dir, readme: str = None) -> str:
    """Put `model_dir` in a huggingface_hub cache at `root` as `repo_id` (branch main); return its commit."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    if readme is not None:
        (snapshot / "README.md").write_text(readme)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


class FakeHub:
    def __init__(self):
        self.repos = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.calls = []  # (method name, bound arguments, token of the HfApi instance)
        self.fail = None  # (path, exception): the next commit touching `path` raises `exception`

    def install(self, monkeypatch) -> "FakeHub":
        from huggingface_hub import HfApi

        for name in PATCHED:
            monkeypatch.setattr(HfApi, name, self._method(name, getattr(HfApi, name)))
        return self

    def _method(self, name, real):
        fake = getattr(self, "_" + name)
        signature = inspect.signature(real)

        def method(api, *args, **kwargs):
            bound = signature.bind(api, *args, **kwargs)  # TypeError if the real client would not accept it
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            self.calls.append((name, arguments, api.token))
            return fake(**arguments)

        return method

    # ---- what tests inspect --------------------------------------------------------------------
    def names(self):
        return [c[0] for c in self.calls]

    def commits(self):
        return [c[1] for c in self.calls if c[0] == "create_commit"]

    def files(self, repo_id, branch="main"):
        return self.repos[repo_id]["branches"][branch]

    def add_repo(self, repo_id, private=False, files=None):
        self.repos[repo_id] = {"private": private, "branches": {"main": {".gitattributes": b"*.safetensors filter=lfs\n",
                                                                           **(files or {})}}}

    # ---- the fake endpoints --------------------------------------------------------------------
    def _create_repo(self, repo_id, private, exist_ok, **_):
        from huggingface_hub.hf_api import RepoUrl

        if repo_id in self.repos and not exist_ok:
            raise AssertionError("create_repo without exist_ok on an existing repo")
        if repo_id not in self.repos:
            self.add_repo(repo_id, private=bool(private))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def _repo_info(self, repo_id, **_):
        from huggingface_hub.hf_api import ModelInfo

        return ModelInfo(id=repo_id, private=self.repos[repo_id]["private"])

    def _create_branch(self, repo_id, branch, revision, exist_ok, **_):
        branches = self.repos[repo_id]["branches"]
        if branch in branches and not exist_ok:
            raise AssertionError("branch exists")
        branches.setdefault(branch, dict(branches[revision or "main"]))

    def _list_repo_tree(self, repo_id, revision, recursive, **_):
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils.sha import git_hash

        assert recursive
        out = []
        for path, data in self.files(repo_id, revision or "main").items():
            lfs = None
            if path.endswith((".safetensors", ".bin")):
                lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            out.append(RepoFile(path=path, size=len(data), oid=git_hash(data), lfs=lfs))
        return iter(out)

    def _create_commit(self, repo_id, operations, commit_message, revision, **_):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations = list(operations)
        if self.fail and any(op.path_in_repo == self.fail[0] for op in operations):
            error, self.fail = self.fail[1], None
            raise error
        branch = self.files(repo_id, revision or "main")
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                branch[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            elif isinstance(op, CommitOperationDelete):
                del branch[op.path_in_repo]
        self.calls[-1][1]["operations"] = operations  # keep the list, not the consumed iterable
