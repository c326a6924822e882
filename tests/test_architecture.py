"""Architecture contracts that a refactor must keep (import layers are checked by lint-imports in make test)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "prunewise"
FAMILY = re.compile(r"self_attn|\.mlp\b|\.layers\b")


def test_only_the_adapters_and_the_shipped_modeling_file_spell_module_paths():
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("models/") or rel == "export/modeling_prunewise.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "family knowledge outside models/:\n" + "\n".join(found)


def test_only_the_engine_hooks_blocks_and_walks_them():
    hooks = re.compile(r"register_forward(_pre)?_hook|\.backward\(")
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("engine/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if hooks.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "hooks or backward passes outside the engine:\n" + "\n".join(found)
