"""Order files on disk: find their parts, fetch them, read and check their step index.

An order file is Parquet with one row per sample of a global step, in batch order: one file, a
folder of parts, or the published tree (`jhu-clsp/ettin-data-order`):

    <root>/checkpoint_000000/steps_000001_to_000100.parquet, steps_000101_to_000200.parquet, ...
    <root>/checkpoint_.../...          <root>/ext_.../...          <root>/decay_.../...

Its step numbers restart at 1 in each folder. `data.order_file` names the root, one folder or
one file; `data.order_phase` (`checkpoint`, `ext`, `decay`, or a glob of folder names such as
`ext_00*`) picks the folders of one phase from a root that holds several (a root with several
phases and no `order_phase` is refused); a part's phase is that of the folder holding it, at any
depth. Parts are found recursively (names starting with `.`
skipped) and ordered by (folder, first step): folders in natural order (`ext_2` before
`ext_10`), parts by the first `step` they hold, whatever their names. Inside a folder the parts
must not overlap in steps and the steps must be contiguous; the folders' steps are then
renumbered into one sequence for the phase, each folder continuing where the previous ended,
beginning with the first folder's first step. So step `first_step + k` of a `Replay` is the k-th
step of the phase: what skip ranges, resumption and errors name.

A remote order file (s3:// with boto3 and S3_ENDPOINT_URL like the shards; gs://, hf://,
memory://, anything else fsspec reads) is fetched into
`<local_cache>/order_file/<hash of the URL>/` keeping each part's path relative to the URL, so
parts of different folders never share a file; two parts that would (names equal up to case, on
a case-insensitive disk) stop the run naming both. Only the selected phase is downloaded.

Two kinds of file are read: **sample ids** (`step`, `sample_id`, optional `epoch`; `ettin order
export`, the recorder) index the phase's shards; **tokens** (`step`, `input_ids`, optional
`sample_id`, `epoch`; the published schema) are the data themselves (`ettin.data.replay`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ettin.data.remote import download_s3, list_s3
from ettin.data.shards import DataError, is_remote, local_path

if TYPE_CHECKING:
    import pyarrow as pa

PHASES = ("checkpoint", "ext", "decay")
"""The phase folders' prefixes in the published tree (`checkpoint_NNNNNN`, `ext_...`, `decay_...`)."""
PUBLISHED_COLUMNS = ("step", "input_ids")
"""Columns of the published `ettin-data-order` files (`ettin order export --format ettin`)."""


# --------------------------------------------------------------------------- finding the parts


def _natural(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value (`ext_2` < `ext_10`)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _folder(rel: str) -> str:
    parent = PurePosixPath(rel).parent.as_posix()
    return "" if parent == "." else parent


def _phase_of(top: str) -> str:
    """`ext_000123` -> `ext` (a folder name's prefix before its number)."""
    m = re.match(r"^(.*?)_?\d+$", top)
    return m.group(1) if m and m.group(1) else top


def _leaf(rel: str) -> str:
    """The name of the folder holding part `rel` ("" for a part at the top)."""
    return PurePosixPath(_folder(rel)).name if _folder(rel) else ""


def select_parts(rels: list[str], phase: str | None, source: str) -> list[str]:
    """The parts (paths relative to the order file's root) of the phase to train on. A part's
    phase is that of the folder holding it (`ext_000123` -> `ext`), however deep it sits."""
    rels = [r for r in rels if not any(p.startswith(".") for p in PurePosixPath(r).parts)]
    if not rels:
        raise DataError(f"{source}: no .parquet parts in it or in its sub-folders")
    leaves = sorted({_leaf(r) for r in rels}, key=_natural)
    if phase:
        glob = any(c in phase for c in "*?[")

        def chosen(leaf: str) -> bool:
            if not leaf:
                return False
            return fnmatch.fnmatchcase(leaf, phase) if glob else phase in (leaf, _phase_of(leaf))

        picked = [r for r in rels if chosen(_leaf(r))]
        if not picked:
            have = ", ".join(leaf or "(parts at the top)" for leaf in leaves[:8])
            more = ", ..." if len(leaves) > 8 else ""
            raise DataError(
                f"{source}: data.order_phase={phase} matches none of its folders ({have}{more}); "
                f"give one of {'|'.join(PHASES)} or a glob of folder names, or "
                f"data.order_phase=null for a folder of one phase"
            )
        return picked
    phases = sorted({_phase_of(leaf) for leaf in leaves}, key=_natural)
    if len(phases) > 1:
        names = ", ".join(p or "(parts at the top)" for p in phases)
        raise DataError(
            f"{source} holds the folders of several phases ({names}); choose one with "
            f"data.order_phase={'|'.join(p for p in phases if p) or 'NAME'} (or a glob of folder "
            f"names), or point data.order_file at one phase folder"
        )
    return rels


def local_parts(path: str | Path, phase: str | None = None) -> list[tuple[str, Path]]:
    """(relative name, file) of each part of a local order file, folder or tree (unordered)."""
    path = Path(path)
    if path.is_dir():
        rels = [p.relative_to(path).as_posix() for p in path.rglob("*.parquet") if p.is_file()]
        return [(r, path / r) for r in select_parts(rels, phase, str(path))]
    if not path.exists():
        raise DataError(f"order file {path} not found")
    if phase:
        raise DataError(
            f"data.order_phase={phase} picks folders of an order-file tree, but {path} is one "
            f"file: drop data.order_phase or point data.order_file at the tree's root"
        )
    return [(path.name, path)]


def cache_dest(url: str, local_cache: str) -> Path:
    """Where the parts of the remote order file `url` are kept."""
    return Path(local_cache) / "order_file" / hashlib.sha1(url.encode()).hexdigest()[:16]


def check_collisions(rels: list[str], source: str) -> None:
    """Two parts must never be written to one cache file (also on a case-insensitive disk)."""
    seen: dict[str, str] = {}
    for r in rels:
        key = PurePosixPath(r).as_posix().casefold()
        if key in seen:
            raise DataError(
                f"{source}: parts {seen[key]} and {r} would be stored as one file in "
                f"data.local_cache (their paths differ only in case); rename one of them"
            )
        seen[key] = r


def _listing(url: str):
    """(is a folder, {relative path: bytes} of its .parquet files, get(rel, dest)) of a remote
    order file: boto3 for s3:// (S3_ENDPOINT_URL, as the shards), fsspec for other schemes."""
    from urllib.parse import urlparse

    if urlparse(url).scheme == "s3":
        folder, sizes = list_s3(url, ".parquet")

        def get(rel: str, dest: Path) -> None:
            download_s3(f"{url.rstrip('/')}/{rel}" if rel else url, dest)

        return folder, sizes, get
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        if fs.isdir(root):
            base = root.rstrip("/")
            found = [p for p in fs.find(root) if p.endswith(".parquet")]
            sizes = {PurePosixPath(p).relative_to(base).as_posix(): fs.size(p) for p in found}
            return True, sizes, lambda rel, dest: fs.get_file(f"{base}/{rel}", str(dest))
        sizes = {PurePosixPath(root).name: fs.size(root)}
        return False, sizes, lambda rel, dest: fs.get_file(root, str(dest))
    except (ImportError, OSError, ValueError) as err:
        raise DataError(f"cannot list the order file {url}: {err}") from err


def fetch_order_file(
    path: str, local_cache: str | None, phase: str | None = None
) -> list[tuple[str, Path]]:
    """Local copies of the parts of a remote order file (s3://, gs://, hf://, ...).

    Each part goes to `cache_dest(path)/<its path relative to path>`; a part already there with
    the right size is not fetched again. Local rank 0 downloads, the other ranks wait.
    """
    if not local_cache:
        raise DataError(
            f"data.order_file={path} is remote; set data.local_cache to a local folder to "
            f"download it into"
        )
    from composer.utils import dist

    dest = cache_dest(path, local_cache)
    with dist.run_local_rank_zero_first():
        folder, sizes, get = _listing(path)
        if folder:
            rels = select_parts(list(sizes), phase, path)
        elif phase:
            raise DataError(
                f"data.order_phase={phase} picks folders of an order-file tree, but {path} is "
                f"one file: drop data.order_phase or name the tree's root"
            )
        else:
            rels = list(sizes)
        check_collisions(rels, path)
        if dist.get_local_rank() == 0:
            for rel in rels:
                local = dest / rel
                if local.exists() and local.stat().st_size == sizes[rel]:
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(f".{local.name}.tmp")
                get(rel if folder else "", tmp)
                tmp.replace(local)
    return [(rel, dest / rel) for rel in rels]


def order_parts(path: str | Path, phase: str | None = None) -> list[Path]:
    """The Parquet files of a local order file, folder or tree (sorted by name)."""
    return [p for _, p in sorted(local_parts(path, phase), key=lambda rp: _natural(rp[0]))]


def _parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: not a readable Parquet order file ({err})") from err


def read_order(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """An order table from a Parquet file or a folder of parts (the recorder's output)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = [_parquet(p).read(columns=columns) for p in order_parts(path)]
    table = pa.concat_tables(tables, promote_options="default")
    if "order_step" in table.column_names and table.column("order_step").null_count:
        # parts recorded before a skip range was added: their order step is their step
        i = table.column_names.index("order_step")
        filled = pc.coalesce(table.column("order_step"), table.column("step"))
        table = table.set_column(i, "order_step", filled)
    return table


def write_order(table: pa.Table, path: str | Path) -> Path:
    """Write an order table as one Parquet file (atomically)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the step index


@dataclass
class _Part:
    name: str
    path: Path
    file: object
    cols: dict[str, np.ndarray]

    @property
    def folder(self) -> str:
        return _folder(self.name)

    @property
    def first(self) -> int:
        return int(self.cols["step"].min())

    @property
    def last(self) -> int:
        return int(self.cols["step"].max())


def _arrange(parts: list[_Part], source: str, has_tokens: bool) -> dict[str, np.ndarray]:
    """The columns of `parts` (in (folder, first step) order) concatenated, each folder's steps
    renumbered to continue the previous folder's; overlapping parts, unsorted token parts and
    gaps are refused."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in parts[0].cols}
    next_step: int | None = None
    i = row0 = 0  # first part and first row of the folder
    while i < len(parts):
        j = i
        while j < len(parts) and parts[j].folder == parts[i].folder:
            j += 1
        group = parts[i:j]
        for a, b in zip(group, group[1:]):
            if b.first <= a.last:
                raise DataError(
                    f"{source}: parts {a.name} (steps {a.first}-{a.last}) and {b.name} (steps "
                    f"{b.first}-{b.last}) overlap in steps {b.first}-{min(a.last, b.last)}; every "
                    f"step must be in one part only: remove or fix one of them"
                )
        cols: dict[str, np.ndarray] = {}
        for c in out:
            cols[c] = np.concatenate([p.cols[c] for p in group])
        steps = cols["step"]
        back = np.nonzero(np.diff(steps) < 0)[0]
        if len(back):
            row = int(back[0]) + 1
            if has_tokens:
                part, local = _part_of_row(group, row)
                raise DataError(
                    f"{source}: row {row0 + row} has step {int(steps[row])} after step "
                    f"{int(steps[row - 1])} (in {part.name}, its row {local}); the rows of a token "
                    f"order file must be sorted by step (sort the file by `step`, keeping the "
                    f"order inside each step)"
                )
            order = np.argsort(steps, kind="stable")  # keep file order inside a step
            cols = {c: v[order] for c, v in cols.items()}
            steps = cols["step"]
        uniq = np.unique(steps)
        if len(uniq) != uniq[-1] - uniq[0] + 1:
            gap = int(uniq[np.nonzero(np.diff(uniq) != 1)[0][0]]) + 1
            where = f" (folder {group[0].folder})" if group[0].folder else ""
            raise DataError(
                f"{source}: steps are not contiguous (step {gap} is missing{where}); give every "
                f"step from {int(uniq[0])} to {int(uniq[-1])}, or drop steps with data.skip_steps"
            )
        if next_step is not None:
            cols["step"] = steps - int(uniq[0]) + next_step
        next_step = int(cols["step"][-1]) + 1
        for c in out:
            out[c].append(cols[c])
        i, row0 = j, row0 + len(steps)
    return {c: np.concatenate(v) for c, v in out.items()}


def _part_of_row(group: list[_Part], row: int) -> tuple[_Part, int]:
    for p in group:
        n = len(p.cols["step"])
        if row < n:
            return p, row
        row -= n
    return group[-1], row  # pragma: no cover


@dataclass
class Replay:
    """An order file: step `first_step + k` is rows `bounds[k]:bounds[k+1]` (file order).

    `batch(k)` gives the ids the loader fetches: shard sample ids, or (when the file holds the
    tokens) row positions, which `ettin.data.replay.OrderTokens` turns into tokens and mask ids.
    """

    bounds: np.ndarray
    first_step: int
    source: str
    sample_ids: np.ndarray | None = None
    epochs: np.ndarray | None = None
    has_tokens: bool = False
    parts: list[Path] = field(default_factory=list)
    """The files, in step order (token files only)."""
    groups: np.ndarray | None = None
    """(part, row group, first row) of every row group, in row order (token files only)."""
    names: list[str] = field(default_factory=list)
    """Each part's path relative to the order file (as `parts`)."""

    @property
    def num_steps(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_rows(self) -> int:
        return int(self.bounds[-1])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def batch(self, k: int) -> np.ndarray:
        lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
        if self.has_tokens:
            return np.arange(lo, hi, dtype=np.int64)
        return self.sample_ids[lo:hi]

    def epoch_of(self, k: int) -> np.ndarray | None:
        if self.epochs is None:
            return None
        return self.epochs[self.bounds[k] : self.bounds[k + 1]]

    def step_of_row(self, row: int) -> int:
        return self.first_step + int(np.searchsorted(self.bounds, row, side="right")) - 1

    def where(self, row: int) -> str:
        """`step S, row R` of a row (plus its part when the file has several) for messages."""
        out = f"step {self.step_of_row(row)}, row {row}"
        if len(self.names) > 1 and self.groups is not None:
            g = int(np.searchsorted(self.groups[:, 2], row, side="right")) - 1
            out += f" (in {self.names[int(self.groups[g, 0])]})"
        return out

    @classmethod
    def open(
        cls, path: str | Path, *, local_cache: str | None = None, phase: str | None = None
    ) -> Replay:
        """Read and check an order file's index (its `step` column, and ids / epochs)."""
        source = local_path(path)  # a file:// URL is a local file or folder
        if is_remote(source):
            found = fetch_order_file(source, local_cache, phase)
        else:
            found = local_parts(source, phase)
        if phase:
            source = f"{source} (data.order_phase={phase})"
        files = [(rel, p, _parquet(p)) for rel, p in found]
        key = {"step", "sample_id", "epoch", "input_ids"}
        names = set(files[0][2].schema_arrow.names)
        for rel, _, f in files[1:]:
            if set(f.schema_arrow.names) & key != names & key:
                raise DataError(
                    f"{source}: part {rel} has columns {sorted(f.schema_arrow.names)}, "
                    f"{files[0][0]} {sorted(names)}; every part must have the same columns"
                )
        has_tokens = "input_ids" in names
        if "step" not in names or not (has_tokens or "sample_id" in names):
            raise DataError(
                f"{source}: an order file needs a `step` column and `sample_id` (ids into the "
                f"shards) or `input_ids` (the tokens themselves); it has {sorted(names)}. Write "
                f"one with `ettin order export` (`--format ettin` for step + input_ids)"
            )
        if has_tokens:
            import pyarrow as pa

            kind = files[0][2].schema_arrow.field("input_ids").type
            if not (
                (pa.types.is_list(kind) or pa.types.is_large_list(kind))
                and pa.types.is_integer(kind.value_type)
            ):
                raise DataError(f"{source}: `input_ids` is {kind}, not a list of integer token ids")
        wanted = [c for c in ("step", "sample_id", "epoch") if c in names]
        parts = []
        for rel, p, f in files:
            t = f.read(columns=wanted)
            if t.num_rows:
                cols = {c: np.asarray(t.column(c).to_numpy(), np.int64) for c in wanted}
                parts.append(_Part(rel, p, f, cols))
        if not parts:
            raise DataError(f"{source}: the order file is empty")
        parts.sort(key=lambda p: (_natural(p.folder), p.first, _natural(p.name)))
        col = _arrange(parts, source, has_tokens)
        steps = col["step"]
        uniq, starts = np.unique(steps, return_index=True)
        ids = col.get("sample_id")
        if ids is not None and (ids < 0).any():
            raise DataError(
                f"{source}: negative sample_id at step {int(steps[np.argmax(ids < 0)])}"
            )
        groups = None
        if has_tokens:
            rows, out = 0, []
            for n, part in enumerate(parts):
                for g in range(part.file.num_row_groups):
                    out.append((n, g, rows))
                    rows += part.file.metadata.row_group(g).num_rows
            groups = np.asarray(out, np.int64).reshape(-1, 3)
        return cls(
            bounds=np.append(starts, len(steps)).astype(np.int64),
            first_step=int(uniq[0]),
            source=source,
            sample_ids=ids,
            epochs=col.get("epoch"),
            has_tokens=has_tokens,
            parts=[p.path for p in parts],
            groups=groups,
            names=[p.name for p in parts],
        )

    def check_rows(self, max_seq_len: int, vocab_size: int | None) -> int:
        """Check every row's length and ids (reads the whole file); returns the rows checked."""
        for part, group, first in self.groups.tolist():
            values, offsets = read_group(self.parts[part], group)
            lengths = np.diff(offsets)
            long = np.nonzero(lengths > max_seq_len)[0]
            if len(long):
                row = first + int(long[0])
                raise DataError(too_long(self, row, int(lengths[long[0]]), max_seq_len))
            if vocab_size is not None and len(values):
                over = np.nonzero(values >= vocab_size)[0]
                if len(over):
                    row = first + int(np.searchsorted(offsets, over[0], side="right")) - 1
                    raise DataError(out_of_vocab(self, row, int(values[over[0]]), vocab_size))
        return self.num_rows


def too_long(rep: Replay, row: int, n: int, max_seq_len: int) -> str:
    return (
        f"{rep.source}: {rep.where(row)} holds {n} tokens, more than "
        f"data.max_seq_len={max_seq_len}; the file was made for longer sequences: train with "
        f"data.max_seq_len={n} or more"
    )


def out_of_vocab(rep: Replay, row: int, token: int, vocab: int) -> str:
    return (
        f"{rep.source}: {rep.where(row)} holds token id {token}, outside "
        f"the tokenizer's {vocab} ids; the file was made with another tokenizer: use that one "
        f"(config key `tokenizer`)"
    )


def read_group(path: Path, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, row offsets) of `input_ids` in one row group."""
    import pyarrow as pa

    col = _parquet(path).read_row_group(group, columns=["input_ids"]).column(0)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    offsets = np.asarray(arr.offsets.to_numpy(), np.int64)
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), np.int64)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]
