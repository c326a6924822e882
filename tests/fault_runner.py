"""Runs one prunewise command in a child process, pausing at a chosen point so a test can kill it there.

    python tests/fault_runner.py STAGE SIGNAL_FILE SECONDS -- prunewise-args...

STAGE names where the pause goes: ``prune`` (after the first block is pruned), ``save`` (after the
temporary folder is fully written, before it is renamed into place), ``cell:N`` (inside the N-th
sweep cell, 1-based), ``checkpoint`` (after the first recovery checkpoint is written), ``fetch`` (run ``fetch_distribution`` of the pinned test distribution given as
JSON in the arguments, pausing inside the download). The child pauses once: it writes SIGNAL_FILE,
then waits until SIGNAL_FILE.go exists or SECONDS have passed, then goes on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_PAUSED = []


def _pause(signal_file: str, seconds: float) -> None:
    if _PAUSED:
        return
    _PAUSED.append(True)
    Path(signal_file).write_text("paused")
    end = time.time() + seconds
    while time.time() < end and not Path(f"{signal_file}.go").exists():
        time.sleep(0.05)


def main() -> int:
    stage, signal_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    if stage == "fetch":
        from prunewise import cache

        spec = json.loads(args[0])
        dist = cache.Distribution(**spec)
        cache.DISTRIBUTIONS[(dist.package, dist.version)] = dist
        real = cache._download

        def slow(url, d, dest):
            Path(signal_file).write_text("downloading")
            time.sleep(seconds)
            return real(url, d, dest)

        cache._download = slow
        print(cache.fetch_distribution(dist.package, dist.version))
        return 0
    from prunewise import cli

    if stage == "prune":
        import prunewise.pipeline.visitor as pruner

        real = pruner.PruneVisitor.visit

        def visit(self, *a, **k):
            out = real(self, *a, **k)
            _pause(signal_file, seconds)
            return out

        pruner.PruneVisitor.visit = visit
    elif stage == "save":
        from prunewise.export import save

        real_write = save._write

        def write(*a, **k):
            real_write(*a, **k)
            _pause(signal_file, seconds)

        save._write = write
    elif stage == "checkpoint":
        from prunewise.engine import train

        real_save = train._save

        def save_checkpoint(*a, **k):
            real_save(*a, **k)
            _pause(signal_file, seconds)

        train._save = save_checkpoint
    elif stage.startswith("cell:"):
        from prunewise import sweep

        target, count = int(stage.split(":")[1]), [0]
        real_cell = sweep._run_cell

        def run_cell(*a, **k):
            count[0] += 1
            out = real_cell(*a, **k)
            if count[0] == target:
                _pause(signal_file, seconds)
            return out

        sweep._run_cell = run_cell
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
