"""How fast the `ettin` command answers: `--help` of every subcommand and `ettin sizes`, against
the start-up of the bare interpreter (`python -c pass`), run side by side.

    .venv/bin/python bench/bench_cli.py [--repeats 5]

Each command runs as its own process `--repeats` times, interleaved with the baseline; the table
shows the median wall time, the difference from the baseline, and the ratio. Start-up is what a
user waits for: every subcommand imports only what it needs (torch is not imported to print help
or the size table).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = [
    ["--help"],
    ["sizes"],
    *[
        [sub, "--help"]
        for sub in (
            "prep",
            "tokenizer",
            "order",
            "data",
            "recipe",
            "eval",
            "demo",
            "export",
            "import",
            "publish",
            "train",
        )
    ],
]


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base_cmd = [sys.executable, "-c", "pass"]
    rows = []
    for sub in COMMANDS:
        cmd = [str(BIN / "ettin"), *sub]
        _time(cmd)  # warm the file cache
        ours, base = [], []
        for _ in range(args.repeats):
            base.append(_time(base_cmd))
            ours.append(_time(cmd))
        rows.append((" ".join(["ettin", *sub]), statistics.median(ours), statistics.median(base)))
    print(f"{'command':<26} {'median s':>9} {'python -c pass':>15} {'extra s':>8} {'ratio':>6}")
    for name, ours, base in rows:
        print(f"{name:<26} {ours:>9.3f} {base:>15.3f} {ours - base:>8.3f} {ours / base:>5.1f}x")
    slowest = max(rows, key=lambda r: r[1])
    print(f"slowest: {slowest[0]} {slowest[1]:.3f} s (target: well under 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
