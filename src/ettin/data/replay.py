"""Order files: read and check them, train from them (replay), export and audit orders.

An order file is Parquet (one file, or a folder of parts) with one row per sample of a global
step, in batch order. Two kinds are read by `data.order_file`:

- **sample ids** (`step`, `sample_id`, optional `epoch`): what `ettin order export` and the
  recorder write. The ids index the phase's shards (`data.path`), which supply the tokens.
- **tokens** (`step`, `input_ids`, optional `sample_id`, `epoch`): the published
  `ettin-data-order` schema (`step`, `input_ids`), or `ettin order export --with-tokens`. The file
  *is* the data: no shards are read. A sample's global id, which seeds its MLM mask, is the
  file's `sample_id` when it has one, otherwise its **row position** in the file (rows counted
  over the parts in step order, skipped steps included), so it is stable across resumes.

In both, step `first_step + k` is the k-th step value of the file; the steps must be
contiguous and the rows of a step adjacent (files are sorted by step; a folder's parts are
ordered by their first step). The sample rules (`SampleRules`) are applied to file tokens too.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from ettin.data.dataset import DataError, SampleRules, is_remote

if TYPE_CHECKING:
    import pyarrow as pa

    from ettin.data.order import BatchSchedule, DataOrder

log = logging.getLogger(__name__)

ORDER_COLUMNS = ("step", "sample_id")
"""Columns of a sample-id order file; `epoch` (mask epoch) and `input_ids` are optional."""
PUBLISHED_COLUMNS = ("step", "input_ids")
"""Columns of the published `ettin-data-order` files (`ettin order export --format ettin`)."""
EAGER_CHECK_MAX_BYTES = 1 << 30
"""Token files at most this large have every row checked (length, vocabulary) when opened;
larger ones are checked row by row as they are read (and fully by `ettin order replay`)."""


# --------------------------------------------------------------------------- files


def fetch_order_file(path: str, local_cache: str | None) -> Path:
    """A local copy of a remote order file or folder (s3://, gs://, hf://, ...), via fsspec.

    The parts go to `<local_cache>/order_file/<hash of the URL>/`; parts already there with the
    right size are not fetched again. Local rank 0 downloads, the other ranks wait.
    """
    if not local_cache:
        raise DataError(
            f"data.order_file={path} is remote; set data.local_cache to a local folder to "
            f"download it into"
        )
    from composer.utils import dist

    dest = Path(local_cache) / "order_file" / hashlib.sha1(path.encode()).hexdigest()[:16]
    with dist.run_local_rank_zero_first():
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            folder = fs.isdir(root)
            parts = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if folder else [root]
        except (ImportError, OSError, ValueError) as err:
            raise DataError(f"cannot list the order file {path}: {err}") from err
        if not parts:
            raise DataError(f"{path}: the remote folder holds no .parquet parts")
        dest.mkdir(parents=True, exist_ok=True)
        for part in parts:
            local = dest / Path(part).name
            size = fs.size(part)
            if local.exists() and local.stat().st_size == size:
                continue
            tmp = local.with_name(f".{local.name}.tmp")
            fs.get_file(part, str(tmp))
            tmp.replace(local)
    return dest if folder else dest / Path(parts[0]).name


def order_parts(path: str | Path) -> list[Path]:
    """The Parquet files of a local order file or folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise DataError(f"{path}: folder holds no .parquet parts")
        return parts
    if not path.exists():
        raise DataError(f"order file {path} not found")
    return [path]


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


# --------------------------------------------------------------------------- replay


@dataclass
class Replay:
    """An order file: step `first_step + k` is rows `bounds[k]:bounds[k+1]` (file order).

    `batch(k)` gives the ids the loader fetches: shard sample ids, or (when the file holds the
    tokens) row positions, which `OrderTokens` turns into tokens and mask ids.
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

    @classmethod
    def open(cls, path: str | Path, *, local_cache: str | None = None) -> Replay:
        """Read and check an order file's index (its `step` column, and ids / epochs)."""
        source = str(path)
        if is_remote(source):
            path = fetch_order_file(source, local_cache)
        files = [(p, _parquet(p)) for p in order_parts(path)]
        key = {"step", "sample_id", "epoch", "input_ids"}
        names = set(files[0][1].schema_arrow.names)
        for p, f in files[1:]:
            if set(f.schema_arrow.names) & key != names & key:
                raise DataError(
                    f"{source}: part {p.name} has columns {sorted(f.schema_arrow.names)}, the "
                    f"first part {sorted(names)}; every part must have the same columns"
                )
        has_tokens = "input_ids" in names
        if "step" not in names or not (has_tokens or "sample_id" in names):
            raise DataError(
                f"{source}: an order file needs a `step` column and `sample_id` (ids into the "
                f"shards) or `input_ids` (the tokens themselves); it has {sorted(names)}. Write "
                f"one with `ettin order export` (`--format ettin` for step + input_ids)"
            )
        if has_tokens:
            kind = files[0][1].schema_arrow.field("input_ids").type
            import pyarrow as pa

            if not (
                (pa.types.is_list(kind) or pa.types.is_large_list(kind))
                and pa.types.is_integer(kind.value_type)
            ):
                raise DataError(f"{source}: `input_ids` is {kind}, not a list of integer token ids")
        wanted = [c for c in ("step", "sample_id", "epoch") if c in names]
        cols: dict[str, list[np.ndarray]] = {c: [] for c in wanted}
        firsts = []
        for _, f in files:
            t = f.read(columns=wanted)
            for c in wanted:
                cols[c].append(np.asarray(t.column(c).to_numpy(), np.int64))
            firsts.append(int(cols["step"][-1][0]) if t.num_rows else None)
        keep = [i for i in range(len(files)) if firsts[i] is not None]
        if not keep:
            raise DataError(f"{source}: the order file is empty")
        keep.sort(key=lambda i: firsts[i])  # parts in step order, whatever their names
        files = [files[i] for i in keep]
        col = {c: np.concatenate([cols[c][i] for i in keep]) for c in wanted}
        steps = col["step"]
        back = np.nonzero(np.diff(steps) < 0)[0]
        if len(back):
            row = int(back[0]) + 1
            if has_tokens:
                raise DataError(
                    f"{source}: row {row} has step {int(steps[row])} after step "
                    f"{int(steps[row - 1])}; the rows of a token order file must be sorted by "
                    f"step (sort the file by `step`, keeping the order inside each step)"
                )
            order = np.argsort(steps, kind="stable")  # keep file order inside a step
            col = {c: v[order] for c, v in col.items()}
            steps = col["step"]
        uniq, starts = np.unique(steps, return_index=True)
        if len(uniq) != uniq[-1] - uniq[0] + 1:
            gap = int(uniq[np.nonzero(np.diff(uniq) != 1)[0][0]]) + 1
            raise DataError(
                f"{source}: steps are not contiguous (step {gap} is missing); give every step "
                f"from {int(uniq[0])} to {int(uniq[-1])}, or drop steps with data.skip_steps"
            )
        ids = col.get("sample_id")
        if ids is not None and (ids < 0).any():
            raise DataError(
                f"{source}: negative sample_id at step {int(steps[np.argmax(ids < 0)])}"
            )
        groups = None
        if has_tokens:
            rows, out = 0, []
            for n, (_, f) in enumerate(files):
                for g in range(f.num_row_groups):
                    out.append((n, g, rows))
                    rows += f.metadata.row_group(g).num_rows
            groups = np.asarray(out, np.int64).reshape(-1, 3)
        return cls(
            bounds=np.append(starts, len(steps)).astype(np.int64),
            first_step=int(uniq[0]),
            source=source,
            sample_ids=ids,
            epochs=col.get("epoch"),
            has_tokens=has_tokens,
            parts=[p for p, _ in files],
            groups=groups,
        )

    def check_fits(self, schedule: BatchSchedule, max_seq_len: int, vocab_size: int | None):
        """A token file must fit the run: each step's size is the run's global batch size for
        that step, and (files up to `EAGER_CHECK_MAX_BYTES`) every row is at most `max_seq_len`
        tokens with ids inside the vocabulary."""
        sizes = self.sizes
        want = schedule.sizes(0, len(sizes))
        bad = np.nonzero(sizes != want)[0]
        if len(bad):
            k = int(bad[0])
            raise DataError(
                f"{self.source}: step {self.first_step + k} has {int(sizes[k])} samples but the run's "
                f"global batch at that step is {int(want[k])}; set global_train_batch_size="
                f"{int(sizes[k])} (and no batch-size warm-up) to train on this order file"
            )
        if sum(p.stat().st_size for p in self.parts) > EAGER_CHECK_MAX_BYTES:
            return
        self.check_rows(max_seq_len, vocab_size)

    def check_rows(self, max_seq_len: int, vocab_size: int | None) -> int:
        """Check every row's length and ids (reads the whole file); returns the rows checked."""
        for part, group, first in self.groups.tolist():
            values, offsets = _read_group(self.parts[part], group)
            lengths = np.diff(offsets)
            long = np.nonzero(lengths > max_seq_len)[0]
            if len(long):
                row = first + int(long[0])
                raise DataError(_too_long(self, row, int(lengths[long[0]]), max_seq_len))
            if vocab_size is not None and len(values):
                over = np.nonzero(values >= vocab_size)[0]
                if len(over):
                    row = first + int(np.searchsorted(offsets, over[0], side="right")) - 1
                    raise DataError(_out_of_vocab(self, row, int(values[over[0]]), vocab_size))
        return self.num_rows


def _too_long(rep: Replay, row: int, n: int, max_seq_len: int) -> str:
    return (
        f"{rep.source}: step {rep.step_of_row(row)}, row {row} holds {n} tokens, more than "
        f"data.max_seq_len={max_seq_len}; the file was made for longer sequences: train with "
        f"data.max_seq_len={n} or more"
    )


def _out_of_vocab(rep: Replay, row: int, token: int, vocab: int) -> str:
    return (
        f"{rep.source}: step {rep.step_of_row(row)}, row {row} holds token id {token}, outside "
        f"the tokenizer's {vocab} ids; the file was made with another tokenizer: use that one "
        f"(config key `tokenizer`)"
    )


def _read_group(path: Path, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, row offsets) of `input_ids` in one row group."""
    import pyarrow as pa

    col = _parquet(path).read_row_group(group, columns=["input_ids"]).column(0)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    offsets = np.asarray(arr.offsets.to_numpy(), np.int64)
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), np.int64)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


class OrderTokens(Dataset):
    """The samples of a token order file: `ds[row] -> (global id, ids)`, sample rules applied.

    The global id (the MLM mask's) is the file's `sample_id` of the row, or the row itself. Row
    groups are read on demand and the last few are kept, per process (DataLoader workers too).
    """

    CACHE = 4

    def __init__(self, replay: Replay, rules: SampleRules) -> None:
        self.replay, self.rules = replay, rules
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._warned_truncation = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return self.replay.num_rows

    def raw(self, row: int) -> np.ndarray:
        groups = self.replay.groups
        g = int(np.searchsorted(groups[:, 2], row, side="right")) - 1
        if g not in self._cache:
            part, group, _ = groups[g].tolist()
            self._cache[g] = _read_group(self.replay.parts[part], group)
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        values, offsets = self._cache[g]
        r = row - int(groups[g, 2])
        return values[offsets[r] : offsets[r + 1]]

    def __getitem__(self, row: int) -> tuple[int, np.ndarray]:
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside {self.replay.source} ({len(self)} rows)")
        raw, rules, rep = self.raw(row), self.rules, self.replay
        if len(raw) > rules.max_seq_len:
            raise DataError(_too_long(rep, row, len(raw), rules.max_seq_len))
        if rules.vocab_size is not None and len(raw) and int(raw.max()) >= rules.vocab_size:
            raise DataError(_out_of_vocab(rep, row, int(raw.max()), rules.vocab_size))
        if not self._warned_truncation and len(raw) and raw[0] != rules.cls_id:
            if len(raw) == rules.max_seq_len:
                self._warned_truncation = True
                log.warning(
                    "%s: row %d has %d tokens and no [CLS]; prepending it drops the last token",
                    rep.source,
                    row,
                    len(raw),
                )
        ids = rules.apply(raw, where=f"{rep.source}: step {rep.step_of_row(row)}, row {row}")
        gid = int(rep.sample_ids[row]) if rep.sample_ids is not None else row
        return gid, ids


def open_train_data(data_cfg: Any, rules: SampleRules, tokenizer: Any = None):
    """(train dataset, replay or None) of a run: the shards, or the order file's tokens."""
    from ettin.data.dataset import TokenDataset

    replay = None
    if data_cfg.order_file:
        replay = Replay.open(data_cfg.order_file, local_cache=data_cfg.local_cache)
        if replay.has_tokens:
            return OrderTokens(replay, rules), replay
    base = TokenDataset(
        data_cfg.path,
        data_cfg.train_split,
        rules,
        tokenizer=tokenizer,
        local_cache=data_cfg.local_cache,
    )
    return base, replay


# --------------------------------------------------------------------------- export / audit


def export_order(
    order: DataOrder,
    steps: int,
    *,
    first_step: int = 0,
    dataset: Any = None,
    tokens_only: bool = False,
) -> pa.Table:
    """One row per sample of run steps first_step .. first_step+steps-1: step, sample_id, epoch.

    With `dataset`, an `input_ids` list column holds each sample after the sample rules (BOS,
    truncation, EOS for encoders), i.e. exactly what the model is fed before masking. With
    skipped steps (`data.skip_steps`) `step` is the run's step and `order_step` the order's.
    `tokens_only` writes the published schema: `step` and `input_ids` only.
    """
    import pyarrow as pa

    step_col, order_col, id_col, epoch_col = [], [], [], []
    for run_step, (step, epoch, k) in enumerate(order.iter_steps(first_step, steps), first_step):
        ids = order.global_batch(k, epoch)
        step_col.append(np.full(len(ids), run_step, np.int64))
        order_col.append(np.full(len(ids), step, np.int64))
        id_col.append(ids)
        epoch_col.append(order.mask_epochs(k, epoch))

    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0, np.int64)

    cols = {"step": cat(step_col), "sample_id": cat(id_col), "epoch": cat(epoch_col)}
    if order.skip_ranges:
        cols["order_step"] = cat(order_col)
    rows = cols["sample_id"]
    table = pa.table(cols)
    if dataset is not None:
        tokens = [dataset[int(i)][1].astype(np.uint32) for i in rows]
        if order.replay is not None and order.replay.has_tokens:  # ids are rows of the file
            table = table.set_column(1, "sample_id", pa.array([dataset[int(i)][0] for i in rows]))
        table = table.append_column("input_ids", pa.array(tokens, type=pa.list_(pa.uint32())))
    if tokens_only:
        table = table.select(list(PUBLISHED_COLUMNS))
    return table


@dataclass
class AuditReport:
    """The result of comparing a recorded order with a planned one."""

    steps_compared: int
    first_differing_step: int | None
    detail: str
    same_order_within_steps: bool

    @property
    def ok(self) -> bool:
        return self.first_differing_step is None

    def __str__(self) -> str:
        if self.ok:
            how = (
                "same order"
                if self.same_order_within_steps
                else "same samples (order inside steps differs, e.g. packing)"
            )
            return f"OK: {self.steps_compared} steps match ({how})"
        return f"DIFFERENT at step {self.first_differing_step}: {self.detail}"


def _group(table: pa.Table) -> dict[int, np.ndarray]:
    """Sample ids per order step (`order_step` when the table has it, else `step`)."""
    import pyarrow.compute as pc

    names = table.column_names
    if "step" not in names or "sample_id" not in names:
        raise DataError(f"an order table needs `step` and `sample_id` columns; it has {names}")
    col = table.column("step")
    if "order_step" in names:  # parts recorded before a skip range was added have none
        col = pc.coalesce(table.column("order_step"), col)
    steps = np.asarray(col.to_numpy(), np.int64)
    ids = np.asarray(table.column("sample_id").to_numpy(), np.int64)
    order = np.argsort(steps, kind="stable")
    steps, ids = steps[order], ids[order]
    uniq, starts = np.unique(steps, return_index=True)
    return dict(zip(uniq.tolist(), np.split(ids, starts[1:])))


def audit(recorded: pa.Table, planned: pa.Table, *, ordered: bool = True) -> AuditReport:
    """Compare the samples of each step recorded during training with the planned order.

    Steps are compared on the steps both tables hold, by order step (`order_step` where a
    table has one: runs with skipped steps). With `ordered` (the default: padded runs, where
    the order inside a step decides the microbatches and the ranks' shares) a step differs
    when its sequence of sample ids differs; with `ordered=False` (packed runs, where packing
    reorders samples inside a step) only when its set differs, and order alone is reported
    apart. Recorded steps absent from the plan count as a difference.
    """
    rec, plan = _group(recorded), _group(planned)
    same_order = True
    compared = 0
    for step in sorted(rec):
        if step not in plan:
            return AuditReport(compared, step, "step is recorded but not in the plan", same_order)
        a, b = rec[step], plan[step]
        compared += 1
        if len(a) != len(b) or not np.array_equal(np.sort(a), np.sort(b)):
            missing = np.setdiff1d(b, a)[:5].tolist()
            extra = np.setdiff1d(a, b)[:5].tolist()
            detail = f"{len(a)} recorded vs {len(b)} planned samples; planned but not seen {missing}, seen but not planned {extra}"
            return AuditReport(compared, step, detail, same_order)
        in_order = bool(np.array_equal(a, b))
        if ordered and not in_order:
            pos = int(np.argmax(a != b))
            detail = (
                f"same samples in another order: position {pos} holds {int(a[pos])}, planned "
                f"{int(b[pos])} (order inside a step matters unless the run packs sequences: "
                f"--packed)"
            )
            return AuditReport(compared, step, detail, False)
        same_order = same_order and in_order
    return AuditReport(compared, None, "", same_order)
