"""What the benchmark scripts share: resumable result files and one process per cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def load_results(out: Path, settings: dict, fresh: bool) -> dict:
    """Finished cells from ``out`` when they were measured with the same settings, else an empty result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() and not fresh else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "cells": {}}
    return results


def run_cell_process(cmd: list[str], cell: str) -> dict:
    """Run one cell in its own process (its peak RSS is its own); its JSON is the last line of stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"cell {cell} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])
