"""Sweeps and the allocation search on Ray: a local instance, tiny models, one worker killed mid-cell."""

from __future__ import annotations

import json
import threading
import time

import pytest

from prunewise.errors import PrunewiseError
from prunewise.recipe import make_recipe

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def _ray_down():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _base(setup: dict, **extra):
    return make_recipe(model=setup["model"], calibration=setup["calib"], evaluation=[setup["eval"]], nsamples=4,
                       seqlen=32, eval_tokens=2048, eval_seqlen=64, completions=False, **extra)


def _killer(prefix: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL the first Ray worker whose process title shows it running a task named ``prefix...``."""
    import psutil

    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(prefix):
                proc.kill()
                killed.append((proc.info["pid"], cmd))
                return
        time.sleep(0.1)


def _comparable(folder) -> dict:
    cells = {}
    for path in sorted((folder / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        for k in ("timings", "peak_rss_mb", "seconds"):
            cell.pop(k, None)
        cells[path.name] = cell
    return cells


@pytest.mark.xdist_group("ray")  # one local Ray instance for the tests that start one
@pytest.mark.slow  # a real Ray instance, two workers and a retried one: 50 s on two cores, in make test-all; make test
# checks the sweep driver's Ray path with a stand-in (test_a_failing_cell_is_recorded_...)
def test_a_sweep_on_ray_matches_the_single_process_sweep_and_survives_a_killed_worker(tiny_folder, tmp_path):
    import torch

    from prunewise.sweep import run_sweep

    grid = (["wanda", "sparsegpt"], [0.5], ["uniform"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray cell computes (num_cpus 1): BLAS sums may round otherwise with more threads
    try:
        single = run_sweep(_base(tiny_folder), *grid, tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "ray").mkdir()  # the dense evaluation is keyed by its settings and reused (its Ray task: bench/cluster.py)
    (tmp_path / "ray" / "dense.json").write_bytes((tmp_path / "single" / "dense.json").read_bytes())
    killed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_killer, args=("ray::sweep_cell:", killed, stop), daemon=True)
    watcher.start()
    try:
        on_ray = run_sweep(_base(tiny_folder, ray="local"), *grid, tmp_path / "ray", progress=False)
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 1, "no worker was caught running a cell"
    assert "failed" not in on_ray and len(on_ray["cells"]) == 2  # the killed cell was retried
    assert _comparable(tmp_path / "single") == _comparable(tmp_path / "ray")  # perplexity to the last digit
    assert [c["perplexity"] for c in single["cells"]] == [c["perplexity"] for c in on_ray["cells"]]
    assert not list((tmp_path / "ray").rglob("*.tmp*"))


@pytest.mark.xdist_group("ray")
@pytest.mark.slow  # 30 s of Ray actors starting on two cores: make test-all
def test_a_search_on_two_ray_actors_finds_the_single_process_plan(tiny_folder):
    from prunewise.pipeline.prune import prune

    fields = dict(allocation="search", sparsity=0.5, search_generations=5, search_nsamples=4, search_seqlen=32,
                  profile_nsamples=4, profile_seqlen=32)
    alone = prune(_base(tiny_folder, **fields), progress=False).plan
    spread = prune(_base(tiny_folder, ray="local", search_actors=2, **fields), progress=False).plan
    assert spread.layer_stats["ray_actors"] == 2 and alone.layer_stats["ray_actors"] == 0
    assert spread.modules == alone.modules
    assert spread.layer_stats["history"][-1]["fitness"] == alone.layer_stats["history"][-1]["fitness"]
    assert spread.modules != {m: 0.5 for m in spread.modules}  # the search moved weights


def test_ray_on_a_prune_without_search_is_refused_before_loading(tiny_folder):
    from prunewise.pipeline.prune import prune

    with pytest.raises(PrunewiseError, match="nothing to distribute"):
        prune(_base(tiny_folder, ray="local"), progress=False)


class _Ref:
    def __init__(self, name, run):
        self.name, self.run = name, run


class _FakeRay:
    """Enough of ``ray`` for the sweep driver: tasks run on ``get``; one cell raises, one interrupt is possible."""

    class exceptions:
        class RayError(Exception):
            pass

    def __init__(self, fail: str | None = None, interrupt_after: int | None = None):
        self.fail, self.interrupt_after, self.cancelled, self.got = fail, interrupt_after, [], 0

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                self.name = kw["name"]
                return self

            def remote(self, *args):
                return _Ref(self.name, lambda: fn(*args))

        return Task() if fake else None

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        name = ref.name
        self.got += 1
        if self.interrupt_after is not None and self.got > self.interrupt_after:
            raise KeyboardInterrupt
        if self.fail and name.endswith(self.fail):
            err = self.exceptions.RayError("task failed")
            err.cause = PrunewiseError("a failed Cholesky in model.layers.0.mlp.up_proj")
            raise err
        return ref.run()

    def cancel(self, ref, force=False):
        self.cancelled.append(ref.name)


def test_a_failing_cell_is_recorded_and_the_others_finish_and_an_interrupt_cancels_the_rest(tiny_folder, tmp_path,
                                                                                            monkeypatch):
    import prunewise.sweep as sweep

    grid = (["wanda"], [0.3, 0.5, 0.7], ["uniform"])
    fake = _FakeRay(fail="wanda-uniform-0.5")
    monkeypatch.setattr(sweep, "connect", lambda address: fake)
    out = tmp_path / "sweep"
    summary = sweep.run_sweep(_base(tiny_folder, ray="local"), *grid, out, progress=False)
    assert [c["sparsity"] for c in summary["cells"]] == [0.3, 0.7]
    assert summary["failed"] == {"wanda-uniform-0.5": "PrunewiseError: a failed Cholesky in model.layers.0.mlp.up_proj"}
    assert json.loads((out / "cells" / "wanda-uniform-0.5.failed.json").read_text())["error"].startswith("PrunewiseError")
    assert "Failed (rerun the sweep to retry them): wanda-uniform-0.5" in (out / "report.md").read_text()

    # the rerun retries only the failed cell; an interrupt then cancels what is still running
    fake2 = _FakeRay(interrupt_after=0)
    monkeypatch.setattr(sweep, "connect", lambda address: fake2)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(_base(tiny_folder, ray="local"), ["wanda"], [0.3, 0.5, 0.7, 0.8], ["uniform"], out,
                        progress=False)
    assert sorted(fake2.cancelled) == ["sweep_cell:wanda-uniform-0.5", "sweep_cell:wanda-uniform-0.8"]
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == [
        "wanda-uniform-0.3.json", "wanda-uniform-0.5.failed.json", "wanda-uniform-0.7.json"]


def test_without_ray_installed_the_flag_says_how_to_install_it(monkeypatch):
    import builtins

    from prunewise.core import cluster

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(PrunewiseError, match=r"pip install 'prunewise\[ray\]'"):
        cluster.require_ray()
