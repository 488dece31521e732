"""Resumable builds: the partial output lives beside OUT under a name derived from everything it depends on.

`.OUT.moeforge-partial-<key>`: the key hashes the resolved config, the options that change output bytes,
and each source file's size and mtime. Completed shards are recorded with their sha256 in a small state
file inside (written atomically, after the shard is fsynced), so after Ctrl-C, SIGTERM, SIGKILL or power
loss `--resume` finds the directory again, re-checks each recorded shard's sha256, keeps those that match
and writes the rest. Any other failure removes the directory: nothing half-written is left behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Protocol

from moeforge._version import __version__
from moeforge.checks.finite import FileScan, nonfinite_error
from moeforge.errors import ConfigError, Interrupted, MoeforgeError
from moeforge.sources.checkpoint import read_safetensors_header
from moeforge.writer.hashing import (
    FACTS,
    FileHasher,
    ShardFollower,
    SourceHashCache,
    file_identity,
    known_sha256,
    sha256_file,
    stat_identity,
)
from moeforge.writer.manifest import MANIFEST, source_files, write_manifest
from moeforge.writer.output_dir import commit_output, fsync_dir

try:
    import fcntl
except ImportError:  # not POSIX: builds still work, without the guard against two builds sharing a partial
    fcntl = None

if TYPE_CHECKING:
    from moeforge.options import BuildOptions
    from moeforge.sources.checkpoint import Checkpoint

log = logging.getLogger("moeforge")

STATE = ".moeforge-resume.json"
PARTIAL_TAG = "moeforge-partial-"
# Options that do not change a single output byte, so they may differ between a build and its resume.
_NOT_IN_KEY = {"overwrite", "quiet", "verbose", "resume", "check_finite", "trust_remote_code", "allow_all_same",
               "strict"}


class Job(Protocol):
    """What a session writes for: a build's `Inputs`, or an edit of an existing checkpoint."""

    options: "BuildOptions"
    seed: int
    checkpoints: Dict[str, "Checkpoint"]  # every model read, by reference
    base: "Checkpoint"  # the one whose tokenizer and generation config are copied (recorded as read)
    layout_name: str  # recorded in the manifest
    family_name: str

    def recipe(self) -> dict:
        """JSON data that, with the sources and options, decides every output byte."""


def partial_dirs(out: Path) -> List[Path]:
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{out.name}.{PARTIAL_TAG}*") if p.is_dir())


def build_identity(inputs: Job) -> dict:
    """Everything the output bytes depend on, cheaply: sources by size and mtime, not content."""
    options = {k: v for k, v in dataclasses.asdict(inputs.options).items() if k not in _NOT_IN_KEY}
    sources = {
        ref: {name: file_identity(path) for name, path in files.items()}
        for ref, files in source_files(inputs).items()
    }
    return {"moeforge": __version__, "config": inputs.recipe(), "options": options,
            "sources": sources}


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class BuildSession:
    """One build's partial directory, its lock, its shard journal and its hashes."""

    def __init__(self, out: Path, inputs: Job):
        self.out = Path(out)
        self.inputs = inputs
        self.identity = build_identity(inputs)
        self.key = identity_key(self.identity)
        self.path = self.out.absolute().parent / f".{self.out.name}.{PARTIAL_TAG}{self.key}"
        self.state: dict = {}
        self.resumed = False
        self._lock = threading.Lock()
        self._dir_fd: Optional[int] = None
        self._files: Optional[FileHasher] = None
        self._hash_cache: Optional[SourceHashCache] = None
        self._shards: Optional[ShardFollower] = None
        self._output_hashes: Dict[str, str] = {}
        self._shards_done = 0
        self._nonfinite: Optional[MoeforgeError] = None  # the first source found to hold NaN/Inf

    # ---- before anything is written ---------------------------------------------------------------
    @classmethod
    def open(cls, out: Path, inputs: Job) -> "BuildSession":
        """Find the partial build to resume (read-only); it fixes the seed when none was given."""
        session = cls(out, inputs)
        if inputs.options.resume:
            session._find_resumable()
        return session

    def _find_resumable(self) -> None:
        state = _load_state(self.path)
        if state is not None and state.get("key") == self.key:
            self.state, self.resumed = state, True
            if self.inputs.options.random_seed is None:
                self.inputs.seed = int(state["seed"])
            log.info("resuming %s: %d shard(s) recorded", self.path, len(state.get("shards", {})))
            return
        for other in partial_dirs(self.out):
            old = _load_state(other)
            if other != self.path and old is not None and "identity" in old:
                raise ConfigError(
                    f"{self.out}: cannot resume: the partial build in {other} was made with other inputs "
                    f"(changed: {describe_change(old['identity'], self.identity)}); "
                    "rerun without --resume to discard it and start over"
                )
        log.warning("%s: no partial build to resume; building from the start", self.out)

    def reusable_bytes(self) -> int:
        """Bytes already on disk in recorded shards (credited by the free-space check)."""
        return sum(rec["size"] for name, rec in self.state.get("shards", {}).items()
                   if (self.path / name).is_file())

    def discard_stale(self) -> None:
        """Partial builds of OUT that this build does not continue are abandoned work: remove them."""
        for other in partial_dirs(self.out):
            if self.resumed and other == self.path:
                continue
            with _locked(other, f"{self.out}: another moeforge build is writing {other}"):
                if (other / STATE).exists():
                    log.warning("discarding the partial build in %s (pass --resume to continue one)", other)
                shutil.rmtree(other, ignore_errors=True)

    # ---- writing ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def partial_dir(self) -> Iterator[Path]:
        """Yield the partial directory; rename it to OUT on success, keep it on interruption, else remove it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if fcntl is not None:
                self._dir_fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ConfigError(f"{self.out}: cannot create the partial build {self.path} ({e.strerror or e})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._release()
                raise MoeforgeError(f"{self.out}: another moeforge build is writing {self.path}") from None
        if not self.resumed:
            self.state = {"key": self.key, "identity": self.identity, "shards": {}, "sources": {}}
        self.state["seed"] = self.inputs.seed
        self._files, self._shards = FileHasher(), ShardFollower()
        try:
            self._save_state()
            self._hash_sources()
            yield self.path
            os.unlink(self.path / STATE)
            self._close_hashers()
            commit_output(self.path, self.out, self.inputs.options.overwrite)
        except KeyboardInterrupt as e:
            self._close_hashers(cancel=True)
            self._save_state()
            self._release()
            raise Interrupted(getattr(e, "signum", 2), partial=self.path) from None
        except BaseException:
            self._close_hashers(cancel=True)
            self._release()
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._release()

    def _close_hashers(self, cancel: bool = False) -> None:
        for worker in (self._files, self._shards):
            if worker is not None:
                worker.close(cancel)

    def _release(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # also drops the flock
            self._dir_fd = None

    # The journal the shard writer calls: begin(path) before each shard, completed(path) after writing one.
    def begin(self, path: Path) -> bool:
        """True: `path` is a shard the interrupted build completed, its sha256 still matches, skip it.
        False: the writer writes it now; it is hashed as it is written."""
        self.raise_nonfinite()
        rec = self.state.get("shards", {}).get(path.name)
        if rec is not None:
            if path.is_file() and path.stat().st_size == rec["size"] and sha256_file(path) == rec["sha256"]:
                self._output_hashes[path.name] = rec["sha256"]
                self._shards_done += 1
                return True
            log.warning("%s: does not match its recorded sha256; writing it again", path.name)
            with self._lock:
                del self.state["shards"][path.name]
        if path.exists():
            path.unlink()  # the follower must only ever see the new bytes
        self._shards.begin(path, self._record_shard)
        return False

    def completed(self, path: Path) -> None:
        """A shard is written and fsynced; it is recorded (resumable) once its hash is done."""
        self._shards.end(path)
        self._shards_done += 1

    def _record_shard(self, path: Path, digest: str) -> None:
        with self._lock:
            self._output_hashes[path.name] = digest
            self.state["shards"][path.name] = {"size": path.stat().st_size, "sha256": digest}
        self._save_state()

    # ---- sources and manifest ------------------------------------------------------------------------
    def _hash_sources(self) -> None:
        """Read each source file once, on the hashing thread, for what is not known yet: its sha256 and
        (check_finite) NaN/Inf in its tensors. Known: from the interrupted build being resumed, the Hugging
        Face cache's blob names, or `SourceHashCache`."""
        opts = self.inputs.options
        if not (opts.hash_sources or opts.check_finite):
            return
        known = self.state.setdefault("sources", {})
        self._hash_cache = SourceHashCache()
        for files in source_files(self.inputs).values():
            for path in files.values():
                facts = self._hash_cache.get(path)
                rec = known.get(str(path))
                if rec is not None and {k: rec.get(k) for k in ("size", "mtime_ns")} == file_identity(path):
                    facts.update({k: rec[k] for k in FACTS if k in rec})
                blob_sha = known_sha256(path)
                if "sha256" not in facts and blob_sha:
                    facts["sha256"] = blob_sha
                need_sha = opts.hash_sources and "sha256" not in facts
                scan = None
                if opts.check_finite and "nonfinite" not in facts:
                    scan = FileScan(read_safetensors_header(path).values()) if path.suffix == ".safetensors" else None
                    if scan is None or not scan.spans:
                        facts["nonfinite"], scan = {}, None  # nothing to check in this file
                if need_sha or scan is not None:
                    self._files.submit(path, functools.partial(self._read_source, stat_identity(path), facts, scan),
                                       sha256=need_sha, visit=scan.feed if scan is not None else None)
                else:
                    self._record_source(path, facts)
        self.raise_nonfinite()

    def _read_source(self, ident: dict, facts: dict, scan: Optional[FileScan], path: Path,
                     digest: Optional[str]) -> None:
        facts = {**facts, **({"sha256": digest} if digest is not None else {}),
                 **({"nonfinite": scan.nonfinite} if scan is not None else {})}
        self._hash_cache.put(path, ident, facts)
        self._record_source(path, facts)

    def _record_source(self, path: Path, facts: dict) -> None:
        with self._lock:
            self.state["sources"][str(path)] = {**file_identity(path), **facts}
            if self.inputs.options.check_finite and self._nonfinite is None:
                self._nonfinite = nonfinite_error(path, facts.get("nonfinite"))

    def raise_nonfinite(self) -> None:
        """Stop the build once a source is known to hold NaN/Inf (called between shards and at the end)."""
        if self._nonfinite is not None:
            raise self._nonfinite

    def write_manifest(self, tmp: Path) -> None:
        """Last step before the rename: sha256 of every file now in `tmp`, and of the sources."""
        self._shards.wait()
        self._files.wait()
        self.raise_nonfinite()
        if self._hash_cache is not None:
            self._hash_cache.save()
        outputs = {}
        for p in sorted(tmp.iterdir()):
            if p.name in (STATE, MANIFEST) or not p.is_file():
                continue
            outputs[p.name] = self._output_hashes.get(p.name) or sha256_file(p)
        sources: Dict[str, Dict[str, dict]] = {}
        for ref, files in source_files(self.inputs).items():
            recs = sources[ref] = {}
            for name, path in files.items():
                ident = file_identity(path)
                if self.inputs.options.hash_sources:
                    recs[name] = {"size": ident["size"], "sha256": self.state["sources"][str(path)]["sha256"]}
                else:
                    recs[name] = ident
        inputs = self.inputs
        write_manifest(tmp, outputs, sources, inputs.layout_name, inputs.family_name, inputs.options.hash_sources)

    def _save_state(self) -> None:
        """Atomically: a crash leaves the old state or the new one, never a torn file."""
        with self._lock:
            data = json.dumps(self.state, sort_keys=True)
            tmp = self.path / (STATE + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / STATE)
            fsync_dir(self.path)


@contextlib.contextmanager
def _locked(path: Path, busy_message: str):
    try:
        fd = os.open(path, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MoeforgeError(busy_message) from None
        yield
    finally:
        os.close(fd)


def _load_state(path: Path) -> Optional[dict]:
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("shards"), dict) else None


def describe_change(old: dict, new: dict) -> str:
    """What differs between two build identities, named as config fields, options and source files."""
    a, b = _flatten(old), _flatten(new)
    changed: List[str] = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k, _MISSING) == b.get(k, _MISSING):
            continue
        if k[0] == "sources":
            label = f"source file {k[1]}/{k[2]}" if len(k) > 2 else f"source {k[1]}"
        elif k[0] == "moeforge":
            label = "moeforge version"
        else:
            label = ".".join(map(str, k))
        if label not in changed:
            changed.append(label)
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return shown or "unknown"


_MISSING = object()


def _flatten(value, prefix=()) -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, prefix + (i,)))
        return out
    return {prefix: value}
