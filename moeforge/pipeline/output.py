"""The one write path of every command that writes a checkpoint (build, upcycle, add-expert, extract): the
shards through a session (resumable partial directory, hashes), the side files on a helper thread meanwhile,
then the manifest, then the rename into place."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from moeforge.plan import MoEPlan
    from moeforge.writer.resume import BuildSession
    from moeforge.writer.safetensors_stream import ShardedWriteResult


def write_checkpoint(session: "BuildSession", plan: "MoEPlan", max_shard: int, side_files: Callable[[Path], None],
                     copied_from: Path, copied_names: Sequence[str]) -> "ShardedWriteResult":
    """`side_files(tmp)` runs while the shards are copied; `copied_names` in `copied_from` size the disk check."""
    from tqdm.auto import tqdm

    from moeforge.checks.disk import check_free_space, output_bytes
    from moeforge.writer import write_sharded
    from moeforge.writer.background import Background

    opts = session.inputs.options
    session.discard_stale()
    check_free_space(session.out, output_bytes(plan, copied_from, copied_names) - session.reusable_bytes())
    with session.partial_dir() as tmp:
        with Background(side_files, tmp) as computed, \
                tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="writing", disable=opts.quiet) as bar:
            written = write_sharded(tmp, plan.tensors, max_shard, bar, journal=session)
            computed.result()
        session.write_manifest(tmp)
    return written
