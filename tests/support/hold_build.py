"""`python hold_build.py N moeforge-args...`: the moeforge CLI, holding (sleeping in the writer's thread) once N
shards are written, fsynced and recorded, so a test can signal the process at a known point."""
import sys
import time

from moeforge.writer import resume


def hold_after(shards: int) -> None:
    completed = resume.BuildSession.completed

    def completed_then_hold(self, path):
        completed(self, path)
        if self._shards_done >= shards:
            self._shards.wait()  # the shard's hash is recorded: resumable from here
            while True:  # the test signals us here
                time.sleep(0.05)

    resume.BuildSession.completed = completed_then_hold


if __name__ == "__main__":
    hold_after(int(sys.argv[1]))
    sys.argv = ["moeforge"] + sys.argv[2:]
    from moeforge.cli import main

    main()
