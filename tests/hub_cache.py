"""A Hugging Face cache laid out on disk, so Hub ids resolve offline."""
import hashlib
import shutil
from pathlib import Path


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
