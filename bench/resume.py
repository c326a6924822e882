"""A recovery interrupted after a checkpoint and resumed, against one that ran through, on smollm2-135m.

Wanda 50% (8 x 256 wiki windows) + LoRA recovery of 8,192 tokens (4 steps of 4 x 512, a checkpoint every 2):
run A goes through; run B is sent SIGTERM once its first checkpoint is on disk, then SIGKILL 5 s later if it
still runs; the same command again resumes B. The saved tensors of A and B are compared bit for bit.

    python bench/resume.py             # bench/results/resume.json
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRUNEWISE = str(Path(sys.executable).with_name("prunewise"))


def command(out: Path) -> list[str]:
    return [PRUNEWISE, "prune", "--model", "smollm2-135m", "--score", "wanda", "--sparsity", "0.5", "--calibration",
            "wiki", "--nsamples", "8", "--seqlen", "256", "--eval", "wiki-test", "--eval-tokens", "2048",
            "--no-completions", "--no-progress", "--recover", "lora:checkpoint_every=2", "--recover-tokens", "8192",
            "--output", str(out)]


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "masks.safetensors":
            out.update(load_file(f))
    return out


def main() -> None:
    work = Path.home() / ".cache" / "prunewise-bench-resume"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    a, b = work / "through", work / "resumed"
    t0 = time.perf_counter()
    subprocess.run(command(a), check=True, capture_output=True)
    through_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    proc = subprocess.Popen(command(b), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = work / f".{b.name}.recovery"
    while proc.poll() is None and not any(state.rglob("state.pt")):
        time.sleep(0.2)
    checkpoint_seen = any(state.rglob("state.pt"))
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    interrupted_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rerun = subprocess.run(command(b), capture_output=True, text=True)
    resumed_s = time.perf_counter() - t0
    report = json.loads((b / "report.json").read_text())
    ta, tb = tensors(a), tensors(b)
    differing = sorted(k for k in ta if k not in tb or not ta[k].equal(tb[k]))
    out = {"command": "python bench/resume.py", "through_s": through_s, "interrupted_after_s": interrupted_s,
           "checkpoint_seen_before_sigterm": checkpoint_seen, "interrupted_rc": proc.returncode,
           "needed_sigkill": killed, "resumed_s": resumed_s, "resumed_rc": rerun.returncode,
           "resumed_from_step": [p.get("resumed_from") for p in report["recovery"]["parts"]],
           "tensors": len(ta), "differing_tensors": differing,
           "perplexity": {"through": json.loads((a / "report.json").read_text())["perplexity"],
                          "resumed": report["perplexity"]}}
    (HERE / "results" / "resume.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
