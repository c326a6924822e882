"""Reliability: unsafe outputs, failing filesystems, corrupt tensors, and injected faults (kill, concurrency).

Every bad case must end in one line that names the problem and the fix, leave no temporary folder,
and never touch the source model. Faults are injected in child processes (tests/fault_runner.py)
that pause at a chosen point; the test kills them there with SIGKILL.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.export.save import OUTPUT_MARKER, save_pruned

RUNNER = Path(__file__).with_name("fault_runner.py")
pytestmark = pytest.mark.xdist_group("faults")  # one worker starts the module's fault children, once


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _prune_args(setup: dict, out, *extra: str) -> list[str]:
    return ["prune", "--model", setup["model"], "--calibration", setup["calib"], "--eval", setup["eval"],
            "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "256", "--eval-seqlen", "32", "--no-completions",
            "--output", str(out), "--no-progress", *extra]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name
                  or p.name.startswith(".prunewise-probe"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("prunewise: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def nested(tmp_path):
    """parent/tiny: a source model inside a folder, with disjoint calibration and evaluation text elsewhere."""
    parent = tmp_path / "parent"
    model = parent / "tiny"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    return {"parent": parent, "model": str(model), "calib": write_paragraphs(data / "calib.txt", 1),
            "eval": write_paragraphs(data / "eval.txt", 2)}


# ------------------------------------------------------------------ outputs that touch the source model


@pytest.mark.parametrize("where", ["parent", "source", "inside", "symlink-to-parent"])
def test_an_output_that_contains_equals_or_lies_in_the_source_is_refused(nested, tmp_path, capsys, where):
    before = _tree_hash(nested["parent"])
    out = {"parent": nested["parent"], "source": Path(nested["model"]),
           "inside": Path(nested["model"]) / "pruned", "symlink-to-parent": tmp_path / "link"}[where]
    if where == "symlink-to-parent":
        out.symlink_to(nested["parent"], target_is_directory=True)
    assert main(_prune_args(nested, out, "--overwrite")) == 2
    err = _one_error_line(capsys)
    assert "source model" in err and "choose an --output outside it" in err
    assert _tree_hash(nested["parent"]) == before  # byte-identical: nothing removed, nothing added
    assert _leftovers(nested["parent"]) == [] and _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_of_files_prunewise_did_not_write(nested, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(_prune_args(nested, mine, "--overwrite")) == 2
    assert "holds files prunewise did not write" in _one_error_line(capsys)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_prunewise_output(nested, tmp_path):
    out = tmp_path / "out"
    assert main(_prune_args(nested, out)) == 0
    assert (out / OUTPUT_MARKER).is_file()
    assert main(_prune_args(nested, out, "--overwrite", "--sparsity", "0.3")) == 0
    assert json.loads((out / "report.json").read_text())["target_sparsity"] == 0.3
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_current_folder_its_parents_and_the_root_are_refused(nested, tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(_prune_args(nested, out)) == 2
    assert "prunewise writes a new folder" in _one_error_line(capsys)


def test_an_output_under_proc_is_refused_before_any_work(nested, capsys):
    start = time.perf_counter()
    assert main(_prune_args(nested, "/proc/prunewise-out")) == 2
    assert "cannot write /proc/prunewise-out" in _one_error_line(capsys)
    assert not Path("/proc/prunewise-out").exists() and time.perf_counter() - start < 5


# ------------------------------------------------------------------ filesystems that refuse the write


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield lambda path, options: (_mount_tmpfs(path, options), done.append(path))
    for path in done:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_filesystem_is_refused_before_any_work(nested, tmp_path, mounts, capsys):
    ro = tmp_path / "ro"
    mounts(ro, "ro,size=1m")
    assert main(_prune_args(nested, ro / "out")) == 2
    err = _one_error_line(capsys)
    assert f"cannot write {ro / 'out'}" in err and "Read-only file system" in err
    assert list(ro.iterdir()) == []


def test_a_full_filesystem_is_refused_before_pruning_and_a_failing_save_leaves_nothing(nested, tmp_path, mounts,
                                                                                        capsys):
    small = tmp_path / "small"
    mounts(small, "size=1m")
    assert main(_prune_args(nested, small / "out")) == 2
    err = _one_error_line(capsys)
    assert "MB free" in err and f"cannot write {small / 'out'}" in err
    assert list(small.iterdir()) == []
    # The pre-check is an estimate; a save that still runs out of space is one error and leaves nothing.
    big = tiny_model("llama", hidden=256, intermediate=1024)
    with pytest.raises(PrunewiseError) as err:
        save_pruned(big, None, small / "out", {"report.json": "{}"})
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert list(small.iterdir()) == []


# ------------------------------------------------------------------ corrupt tensors and non-finite results


def test_a_nan_in_the_embedding_is_one_line_before_any_work(nested, tmp_path, capsys):
    weights = Path(nested["model"]) / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    assert main(_prune_args(nested, tmp_path / "out")) == 2
    err = _one_error_line(capsys)
    assert "model.embed_tokens.weight" in err and "NaN or infinite" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_non_finite_perplexity_is_shown_as_such_and_never_crashes_a_plot():
    from prunewise.report import figures
    from prunewise.report.build import run_sections

    report = {"model": "m", "score": "wanda", "allocation": "uniform", "structure": "unstructured",
              "target_sparsity": 0.5, "achieved_sparsity": 0.5, "sparsity_of_all_parameters": 0.4,
              "timings": {"prune_s": 1.0}, "peak_rss_mb": 100.0,
              "perplexity": {"a": {"dense": 20.0, "pruned": float("nan")}, "b": {"dense": float("inf"),
                                                                                  "pruned": float("inf")}}}
    _, _, sections = run_sections(report, None)
    table = sections[0][1][0][2]
    assert table[0][2] == "nan" and table[1][1] == "inf"
    assert figures.perplexity_bars({"a": {"dense": float("nan"), "pruned": float("nan")}})[:4] == b"\x89PNG"
    cells = [{"label": "wanda", "sparsity": s, "perplexity": {"a": p}} for s, p in ((0.3, 30.0), (0.9, float("inf")))]
    assert figures.sweep_perplexity({"perplexity": {"a": float("nan")}}, cells)[:4] == b"\x89PNG"


def test_a_pickle_only_checkpoint_is_refused_unless_the_user_opts_in(nested, tmp_path, monkeypatch, capsys):
    folder = Path(nested["model"])
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(_prune_args(nested, tmp_path / "out")) == 2
    err = _one_error_line(capsys)
    assert "only pickle weights" in err and "PRUNEWISE_ALLOW_PICKLE=1" in err
    monkeypatch.setenv("PRUNEWISE_ALLOW_PICKLE", "1")
    assert main(_prune_args(nested, tmp_path / "out")) == 0


def test_remote_code_is_never_trusted_by_default():
    import inspect

    from prunewise.models import loading

    source = inspect.getsource(loading)
    assert "trust_remote_code=True" not in source and source.count("trust_remote_code=False") >= 2


# ------------------------------------------------------------------ injected faults in child processes
#
# Each child imports torch and transformers (several seconds), so all of them start at once, in one
# module fixture, and each test then drives its own child to the fault and checks what it left.


def _child(stage: str, signal_file: Path, seconds: float, args: list[str], **env) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent), OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, str(RUNNER), stage, str(signal_file), str(seconds), "--", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.time() < end, "child never reached the fault point"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


class _Slow(http.server.BaseHTTPRequestHandler):
    """An index with one distribution; it counts the downloads of the file."""

    payload = os.urandom(1 << 20)
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/simple/race-pkg/":
            body = b'<a href="/files/race_pkg-1.0.tar.gz">race_pkg-1.0.tar.gz</a>'
        elif self.path == "/files/race_pkg-1.0.tar.gz":
            body = self.payload
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _sweep_args(setup: dict, out: Path) -> list[str]:
    return ["sweep", "--model", setup["model"], "--calibration", setup["calib"], "--eval", setup["eval"],
            "--eval-tokens", "256", "--eval-seqlen", "32", "--nsamples", "4", "--seqlen", "32", "--scores", "magnitude",
            "--sparsities", "0.2,0.4", "--no-completions", "--output", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Every fault child, started together: name -> (process, its folder, its signal file)."""
    base = tmp_path_factory.mktemp("faults")
    model = base / "source" / "tiny"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    setup = {"model": str(model), "calib": write_paragraphs(base / "calib.txt", 1),
             "eval": write_paragraphs(base / "eval.txt", 2)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    race = {"package": "race-pkg", "version": "1.0", "filename": "race_pkg-1.0.tar.gz",
            "sha256": hashlib.sha256(_Slow.payload).hexdigest(), "size": len(_Slow.payload)}
    fetch_env = {"PRUNEWISE_CACHE": str(base / "race-cache"),
                 "PRUNEWISE_INDEX_URL": f"http://127.0.0.1:{server.server_port}/simple"}
    overwrite = base / "overwrite"
    assert main(_prune_args(setup, overwrite / "out")) == 0  # an earlier, complete output to overwrite
    plan = {
        "prune": ("prune", 300, _prune_args(setup, base / "prune" / "out"), {}),
        "save": ("save", 300, _prune_args(setup, base / "save" / "out"), {}),
        "overwrite": ("save", 300, _prune_args(setup, overwrite / "out", "--overwrite", "--sparsity", "0.3"), {}),
        "sweep": ("cell:2", 300, _sweep_args(setup, base / "sweep" / "out"), {}),
        "lock": ("prune", 300, _prune_args(setup, base / "lock" / "out", "--overwrite"), {}),
        "fetch1": ("fetch", 3, [json.dumps(race)], fetch_env),
        "fetch2": ("fetch", 3, [json.dumps(race)], fetch_env),
    }
    jobs = {}
    for name, (stage, seconds, args, env) in plan.items():
        folder = base / name
        folder.mkdir(exist_ok=True)
        jobs[name] = (_child(stage, folder / "paused", seconds, args, **env), folder, folder / "paused")
    yield {"setup": setup, "jobs": jobs, "fetch_env": fetch_env}
    for proc, _, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    server.shutdown()


@pytest.mark.parametrize("stage", ["prune", "save"])
def test_sigkill_while_pruning_or_saving_leaves_no_partial_output_and_a_rerun_works(faults, stage):
    proc, folder, flag = faults["jobs"][stage]
    out = folder / "out"
    _wait_for(flag, proc)
    _kill(proc)
    assert not out.exists()  # absent, never partial (a save leaves only its hidden temporary folder)
    assert main(_prune_args(faults["setup"], out)) == 0  # a rerun works and cleans up what the kill left
    assert (out / OUTPUT_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert _leftovers(folder) == []


def test_sigkill_while_overwriting_keeps_the_complete_old_output(faults):
    proc, folder, flag = faults["jobs"]["overwrite"]
    before = _tree_hash(folder / "out")
    _wait_for(flag, proc)
    _kill(proc)
    assert _tree_hash(folder / "out") == before
    assert json.loads((folder / "out" / "report.json").read_text())["target_sparsity"] == 0.5


def test_sigkill_of_a_sweep_mid_cell_keeps_finished_cells_and_the_rerun_does_only_the_rest(faults, capsys):
    proc, folder, flag = faults["jobs"]["sweep"]
    out = folder / "out"
    _wait_for(flag, proc)
    _kill(proc)
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["magnitude-uniform-0.2.json"]  # the killed cell left no file, not even a partial one
    first = (out / "cells" / cells[0]).stat().st_mtime_ns
    assert main(_sweep_args(faults["setup"], out)) == 0
    printed = capsys.readouterr().out
    assert "magnitude-uniform-0.2: done before" in printed and "magnitude-uniform-0.4: finished" in printed
    assert (out / "cells" / cells[0]).stat().st_mtime_ns == first
    assert sorted(p.name for p in (out / "cells").iterdir() if not p.name.startswith(".")) == [
        "magnitude-uniform-0.2.json", "magnitude-uniform-0.4.json"]


def test_two_prunes_to_one_output_one_wins_the_other_gets_one_line(faults, capsys):
    proc, folder, flag = faults["jobs"]["lock"]
    out = folder / "out"
    _wait_for(flag, proc)  # the first is pruning and holds the output's lock
    assert main(_prune_args(faults["setup"], out, "--overwrite")) == 2
    assert "another prunewise process is writing" in _one_error_line(capsys)
    Path(f"{flag}.go").write_text("")  # let the first finish
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert (out / OUTPUT_MARKER).is_file() and _leftovers(folder) == []
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None  # the output is whole


def test_two_first_use_fetches_into_one_empty_cache_download_once(faults):
    procs = [faults["jobs"][name][0] for name in ("fetch1", "fetch2")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == outs[1][0].strip()  # the same cached file
    folder = Path(faults["fetch_env"]["PRUNEWISE_CACHE"]) / "packages" / "race-pkg-1.0"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "download.json", "race_pkg-1.0.tar.gz"]
    assert hashlib.sha256((folder / "race_pkg-1.0.tar.gz").read_bytes()).digest() == \
        hashlib.sha256(_Slow.payload).digest()
    assert _Slow.hits.count("/files/race_pkg-1.0.tar.gz") == 1  # one download; the other waited for it


# ------------------------------------------------------------------ a disk that fills, files damaged on disk


@pytest.mark.parametrize("where", ["masks", "shards"])
def test_offload_disk_running_out_of_space_is_one_line_naming_the_folder_and_the_space(nested, tmp_path, capsys,
                                                                                         monkeypatch, where):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from prunewise.engine import streaming

    if where == "masks":  # core/masks.py pack() spills each block's masks with safetensors' save_file
        real = safetensors.torch.save_file

        def full(tensors, path, *a, **k):
            if "-masks" in str(path):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, path, *a, **k)

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        def full(path, tensors, metadata):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(streaming, "write_safetensors", full)
    before = _tree_hash(nested["parent"])
    assert main(_prune_args(nested, tmp_path / "out", "--offload", "disk", "--eval")) == 2
    err = _one_error_line(capsys)
    assert f"cannot write {tmp_path / 'out'}" in err and "No space left on device (it needs about" in err
    assert "MB free" in err and "free some space or choose another --output" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == [] and not list(tmp_path.glob(".out*"))
    assert _tree_hash(nested["parent"]) == before


def test_a_mask_file_whose_data_was_zeroed_is_refused(nested, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(_prune_args(nested, pruned)) == 0
    file = pruned / "masks.safetensors"
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n:] = bytes(len(data) - 8 - n)  # the header intact, every mask bit cleared
    file.write_bytes(bytes(data))
    args = ["recover", "--model", str(pruned), "--recover", "lora:seqlen=32:tokens=1024:batch=2", "--output",
            str(tmp_path / "rec"), "--no-progress"]
    assert main(args) == 2
    assert f"the mask set {file} is damaged: its data does not match the checksum" in _one_error_line(capsys)
    assert main(["apply-masks", "--model", nested["model"], "--masks", str(pruned), "--output",
                 str(tmp_path / "x")]) == 2
    assert "is damaged" in _one_error_line(capsys)
    # a file written before the checksum existed: recover still sees that the mask does not mark the folder's zeros
    header = json.loads(data[8:8 + n])
    header["__metadata__"].pop("sha256")
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data[8 + n:]))
    assert main(args) == 2
    assert "zero weights its mask does not mark (the mask removes 0)" in _one_error_line(capsys)
    assert not (tmp_path / "rec").exists() and not (tmp_path / "x").exists()


def test_corrupt_or_truncated_sweep_files_are_recomputed_with_a_warning(nested, tmp_path, capsys, caplog, monkeypatch):
    from prunewise import sweep

    monkeypatch.setattr(sweep, "write_sweep_report", lambda out, summary: None)  # figures are not the point here
    out = tmp_path / "sweep"
    args = _sweep_args(nested, out)
    assert main(args) == 0
    cells = out / "cells"
    (out / "dense.json").write_text((out / "dense.json").read_text()[:40])  # truncated
    (cells / "magnitude-uniform-0.2.json").write_text("[1, 2]")  # valid JSON, not a cell
    (cells / "magnitude-uniform-0.4.json").write_text('{"fingerprint": "x", "perplexity": ')  # cut mid-write
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "magnitude-uniform-0.2: finished" in printed and "magnitude-uniform-0.4: finished" in printed
    assert "the dense result" in caplog.text and "holds a list, not a JSON object" in caplog.text
    assert "cell magnitude-uniform-0.4" in caplog.text and "cannot be read" in caplog.text
    assert isinstance(json.loads((out / "dense.json").read_text())["perplexity"], dict)
    assert all(isinstance(json.loads(f.read_text()).get("fingerprint"), str) for f in cells.glob("*.json"))
