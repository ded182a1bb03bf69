"""`make bench`: the CPU benchmarks, each against its named baseline, then one table of ratios.

    .venv/bin/python bench/run_all.py [--only model prep loader] [--full] [--gpu]

Runs, each as its own process (so one's memory and threads do not affect the next):
- bench_model.py: training step, ours vs Hugging Face ModernBERT (17m and 68m, MLM and CLM,
  variable and fixed lengths). By default the quick setting that keeps `make bench` under
  10 minutes on 2 cores (3 timed pairs per case; batches of 4 variable-length sequences or
  one 1024-token row); `--full` uses bench_model's own defaults (two 1024-token rows, 5 pairs).
- bench_prep.py: prep at scale: tokenize at 2 tasks vs 1, the planner at 100M synthetic chunks
  (bytes/chunk, chunks/s), write_shard vs one MDSWriter.
- bench_loader.py: loader tokens/s vs what a 150m model consumes on one GPU.
- with `--gpu` (and CUDA), the GPU check (`python -m ettin_gpu`, `make gpu-check`) as well.
A script that is missing is reported as such; one that fails does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_MODEL_ARGS = ["--fixed-batch", "1", "--repeats", "3"]


def run(script: str, args: list[str]) -> tuple[int | None, str, float]:
    """Run bench/<script> (or `-m <module>`) with this interpreter, echoing its output;
    (rc, output, seconds)."""
    path = HERE / script
    if script.startswith("-m "):
        command = [sys.executable, "-m", script[3:]]
    elif path.exists():
        command = [sys.executable, str(path)]
    else:
        print(f"\n=== {script}: not present, skipped", flush=True)
        return None, "", 0.0
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=HERE.parent,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    print(f"=== {script}: exit {rc}, {seconds:.0f}s", flush=True)
    return rc, "".join(lines), seconds


Row = tuple[str, str, str, str, str, str]  # benchmark, setting, ours, baseline, ratio, target


def model_rows(path: Path) -> list[Row]:
    data = json.loads(path.read_text())
    mean = data["lengths"]["mean"]
    rows: list[Row] = []
    for r in data["results"]:
        obj = r["objective"].upper()
        if r["lengths"] == "var":
            setting = f"{r['batch']} seqs, len ~{mean:.0f} (fill {r['fill']:.2f})"
        else:
            setting = f"{r['batch']} x 1024 tokens"
        rows.append(
            (
                f"train step {r['size']} {obj}",
                setting,
                f"{r['ours_tok_s']:,.0f} tok/s",
                f"HF {r['hf_tok_s']:,.0f}",
                f"{r['speed_ratio']:.2f}x (fwd+bwd {r['fwd_bwd_ratio']:.2f}x)",
                ">= 1.5x" if r["lengths"] == "var" else "-",
            )
        )
    for r in data["results"]:
        if r["mem_ratio"] is None:
            continue
        rows.append(
            (
                f"step memory {r['size']} {r['objective'].upper()}",
                "var" if r["lengths"] == "var" else "fixed 1024",
                f"{r['ours_mem_mb']:,.0f} MB",
                f"HF {r['hf_mem_mb']:,.0f} MB",
                f"{r['mem_ratio']:.2f}x",
                "<= 1.0x",
            )
        )
    return rows


def prep_rows(text: str) -> list[Row]:
    """bench_prep's markdown table: `| benchmark | setting | ours | baseline | ratio | target |
    verdict |`, one row per target (the verdict goes with the target)."""
    rows: list[Row] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| prep ") and len(cells) == 7:
            name, setting, ours, base, ratio, target, verdict = cells
            rows.append((name, setting, ours, base, ratio, f"{target} {verdict}"))
    return rows or [("prep", "see bench_prep output above", "", "", "?", "")]


def loader_rows(text: str) -> list[Row]:
    rows: list[Row] = []
    pattern = r"^\s*(mlm|clm)\s+(padded|packed)\s+([\d.]+)\s+.*?([\d,]+)\s+[\d.]+\s+([\d.]+)x\s*$"
    for m in re.finditer(pattern, text, re.M):
        rows.append(
            (
                f"loader {m.group(1).upper()} {m.group(2)}",
                f"150m, {m.group(3)} batches/s",
                f"{m.group(4)} tok/s",
                "150m model on 1 GPU",
                f"{m.group(5)}x",
                ">= 20x",
            )
        )
    return rows or [("loader", "see bench_loader output above", "", "", "?", "")]


def print_table(rows: list[Row]) -> None:
    head: Row = ("benchmark", "setting", "ours", "baseline", "ours/baseline", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for k, r in enumerate([head, *rows]):
        print(
            "  ".join(
                c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=["model", "prep", "loader"])
    parser.add_argument("--full", action="store_true", help="bench_model's full setting")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU check (needs CUDA)")
    args = parser.parse_args()
    todo = args.only or ["model", "prep", "loader"]

    t0 = time.perf_counter()
    rows: list[Row] = []
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        if "model" in todo:
            out = Path(tmp) / "model.json"
            extra = [] if args.full else QUICK_MODEL_ARGS
            rc, _, _ = run("bench_model.py", [*extra, "--json", str(out)])
            if rc == 0 and out.exists():
                rows += model_rows(out)
            elif rc is not None:
                failed.append("bench_model.py")
        if "prep" in todo:
            rc, text, _ = run("bench_prep.py", [])
            if rc == 0:
                rows += prep_rows(text)
            elif rc is not None:
                failed.append("bench_prep.py")
        if "loader" in todo:
            rc, text, _ = run("bench_loader.py", [])
            if rc == 0:
                rows += loader_rows(text)
            elif rc is not None:
                failed.append("bench_loader.py")
        if args.gpu:
            rc, _, _ = run("-m ettin_gpu", [])
            if rc not in (0, None):
                failed.append("ettin_gpu")

    total = time.perf_counter() - t0
    print(
        f"\n=== ratios (ours / baseline; speed > 1 is faster, memory < 1 is smaller), {total:.0f}s"
    )
    print_table(rows)
    if failed:
        print(f"failed: {', '.join(failed)} (see their output above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
