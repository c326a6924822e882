"""Sweeps and the allocation search on Ray beside one process, on smollm2-135m.

sweep  8 cells (wanda and sparsegpt x 30/50/60/70%; calibration 8 x 256 wiki windows; 4096 wiki-test tokens):
       1. one process (``prunewise sweep``, one torch thread: as each Ray cell, which reserves one CPU);
       2. ``prunewise sweep --ray local`` (a local Ray instance, one worker per core): one worker SIGKILLed in the
          middle of a cell (it is retried), the driver interrupted (SIGINT) once three cells are written;
       3. the same command again: it must run only the missing cells.
       Cells are compared field by field (timings and memory aside) and report.md with those columns masked.
search ``--allocation search`` for a few generations in one process and on 2 Ray actors: the same plan for the
       same seed? The search's wall-clock time beside each other.

(Named cluster.py, not ray.py: a script named ray.py shadows the ray package in its own child processes.)

    python bench/cluster.py                 # both parts; JSON and a table in bench/results/ray.{json,md}
    python bench/cluster.py --part search
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRUNEWISE = str(Path(sys.executable).with_name("prunewise"))
GRID = ["--scores", "wanda", "sparsegpt", "--sparsities", "0.3,0.5,0.6,0.7"]
SETTINGS = ["--model", "smollm2-135m", "--calibration", "wiki", "--nsamples", "8", "--seqlen", "256",
            "--eval", "wiki-test", "--eval-tokens", "4096", "--no-completions", "--no-progress"]
VOLATILE = ("timings", "peak_rss_mb", "seconds")


def _env(threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _cells(folder: Path) -> dict:
    out = {}
    for path in sorted((folder / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        out[path.stem] = {k: v for k, v in cell.items() if k not in VOLATILE}
    return out


def _masked_report(folder: Path) -> list[str]:
    """report.md with each cell row's last two columns (prune seconds, peak RSS) blanked."""
    lines = []
    for line in (folder / "report.md").read_text().splitlines():
        if line.startswith("| ") and re.search(r"\| [0-9.]+ \| [0-9.]+ \|$", line):
            line = re.sub(r"\| [0-9.]+ \| [0-9.]+ \|$", "| - | - |", line)
        lines.append(line)
    return lines


def _killer(after_s: float, killed: list, stop: threading.Event) -> None:
    """SIGKILL one Ray worker once it has been running a cell for ``after_s`` seconds."""
    import psutil

    seen: dict[int, float] = {}
    while not stop.is_set() and not killed:
        now = time.time()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or []).strip()
            if cmd.startswith("ray::sweep_cell:"):
                first = seen.setdefault(proc.info["pid"], now)
                if now - first >= after_s:
                    proc.kill()
                    killed.append({"pid": proc.info["pid"], "task": cmd, "after_s": round(now - first, 1)})
                    return
        time.sleep(0.5)


def sweep_part(work: Path) -> dict:
    single, spread = work / "single", work / "ray"
    for folder in (single, spread):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([PRUNEWISE, "sweep", *SETTINGS, *GRID, "--output", str(single)], check=True, env=_env(1))
    single_s = time.perf_counter() - t0

    # on Ray: a worker killed mid-cell, then the driver interrupted after three cells
    killed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_killer, args=(20.0, killed, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    driver = subprocess.Popen([PRUNEWISE, "sweep", *SETTINGS, *GRID, "--ray", "local", "--output", str(spread)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    first_lines, interrupted_at = [], None
    for line in driver.stdout:
        first_lines.append(line.rstrip())
        print("  first run:", line.rstrip(), flush=True)
        if interrupted_at is None and len(list((spread / "cells").glob("*-*.json"))) >= 3:
            driver.send_signal(signal.SIGINT)
            interrupted_at = time.perf_counter() - t0
    first_rc = driver.wait()
    first_s = time.perf_counter() - t0
    stop.set()
    watcher.join()
    kept = sorted(p.stem for p in (spread / "cells").glob("*.json") if not p.name.endswith(".failed.json"))

    t0 = time.perf_counter()
    rerun = subprocess.run([PRUNEWISE, "sweep", *SETTINGS, *GRID, "--ray", "local", "--output", str(spread)],
                           capture_output=True, text=True, env=_env())
    rerun_s = time.perf_counter() - t0
    lines = rerun.stdout.splitlines()
    print("\n".join("  rerun: " + x for x in lines), flush=True)
    skipped = sorted(re.findall(r"^sweep: (\S+): done before", rerun.stdout, re.M))
    ran = sorted(re.findall(r"^sweep: (\S+): submitted", rerun.stdout, re.M))

    a, b = _cells(single), _cells(spread)
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    report_same = _masked_report(single) == _masked_report(spread)
    return {"single_s": single_s, "ray_first_run_s": first_s, "ray_first_rc": first_rc,
            "interrupted_after_s": interrupted_at, "cells_kept_after_interrupt": kept, "worker_killed": killed,
            "rerun_s": rerun_s, "rerun_rc": rerun.returncode, "rerun_skipped": skipped, "rerun_ran": ran,
            "cells_single": len(a), "cells_ray": len(b), "differing_cells": differing,
            "report_identical_apart_from_timings": report_same,
            "perplexity": {k: [a[k]["perplexity"]["wiki-test"], b.get(k, {}).get("perplexity", {}).get("wiki-test")]
                           for k in a}}


SEARCH = dict(model="smollm2-135m", calibration="wiki", nsamples=8, seqlen=256, allocation="search", sparsity=0.6,
              search_generations=6, search_nsamples=16, search_seqlen=256, profile_nsamples=8, profile_seqlen=256)


def _search_once(ray: str | None) -> None:
    """Child process: one search; prints the plan's levels and the search's seconds as JSON."""
    from prunewise.pipeline.prune import prune
    from prunewise.recipe import make_recipe

    fields = dict(SEARCH, **({"ray": ray, "search_actors": 2} if ray else {}))
    t0 = time.perf_counter()
    result = prune(make_recipe(**fields), progress=False)
    stats = result.plan.layer_stats
    print(json.dumps({"modules": result.plan.modules, "search_s": stats["seconds"]["total"],
                      "prepare_s": stats["seconds"]["prepare"], "prune_total_s": time.perf_counter() - t0,
                      "fitness": stats["history"][-1]["fitness"], "tracking": stats["final_tracking_fitness"],
                      "generations": stats["history"][-1]["generation"], "actors": stats["ray_actors"],
                      "forwards": stats["forwards"]}))


def search_part() -> dict:
    runs = {}
    for name, ray in (("single", None), ("ray-2-actors", "local")):
        out = subprocess.run([sys.executable, __file__, "--_search", ray or "none"], capture_output=True, text=True,
                             check=True, env=_env())
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    same = runs["single"]["modules"] == runs["ray-2-actors"]["modules"]
    for r in runs.values():
        r["moved_from_uniform"] = sum(abs(v - SEARCH["sparsity"]) for v in r.pop("modules").values())
    return {"settings": SEARCH, "same_plan": same, "runs": runs,
            "search_s_ratio_ray_over_single": runs["ray-2-actors"]["search_s"] / runs["single"]["search_s"]}


def write_table(results: dict, path: Path) -> None:
    lines = ["# Ray", "", f"`{results['command']}`; {os.cpu_count()} cores, shared with other work (times are noisy).", ""]
    s = results.get("sweep")
    if s:
        lines += ["## Sweep: 8 cells, one process vs a local Ray instance", "",
                  "| | seconds | cells | notes |", "|---|---|---|---|",
                  f"| one process (1 thread) | {s['single_s']:.0f} | {s['cells_single']} | |",
                  f"| Ray, first run | {s['ray_first_run_s']:.0f} | {len(s['cells_kept_after_interrupt'])} kept | worker "
                  f"killed: {', '.join(k['task'] for k in s['worker_killed']) or 'none'}; driver interrupted at "
                  f"{s['interrupted_after_s'] or 0:.0f} s (exit {s['ray_first_rc']}) |",
                  f"| Ray, rerun | {s['rerun_s']:.0f} | {len(s['rerun_ran'])} ran, {len(s['rerun_skipped'])} skipped | "
                  f"exit {s['rerun_rc']} |", "",
                  f"Cells differing (timings and memory aside): {s['differing_cells'] or 'none'}; report.md identical "
                  f"apart from timings and memory: {s['report_identical_apart_from_timings']}.", "",
                  "| cell | wiki-test, one process | wiki-test, Ray |", "|---|---|---|"]
        lines += [f"| {k} | {v[0]!r} | {v[1]!r} |" for k, v in s["perplexity"].items()]
        lines.append("")
    r = results.get("search")
    if r:
        lines += ["## Allocation search: one process vs 2 Ray actors", "",
                  f"Same plan: {r['same_plan']}; search time ratio (Ray / one process): "
                  f"{r['search_s_ratio_ray_over_single']:.2f}", "",
                  "| run | search s | prepare s | generations | final KL | tracking KL | forwards |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['search_s']:.0f} | {v['prepare_s']:.0f} | {v['generations']} | {v['fitness']:.5f} | "
                  f"{v['tracking']:.5f} | {v['forwards']} |" for k, v in r["runs"].items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["sweep", "search", "both"], default="both")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "prunewise-bench-ray"))
    ap.add_argument("--out", default=str(HERE / "results" / "ray.json"))
    ap.add_argument("--_search", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._search:
        _search_once(None if args._search == "none" else args._search)
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["command"] = "python bench/cluster.py" + (f" --part {args.part}" if args.part != "both" else "")
    if args.part in ("sweep", "both"):
        results["sweep"] = sweep_part(Path(args.work))
        out.write_text(json.dumps(results, indent=1))
    if args.part in ("search", "both"):
        results["search"] = search_part()
        out.write_text(json.dumps(results, indent=1))
    write_table(results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
