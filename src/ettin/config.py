"""The run configuration: a typed schema, Hydra composition, and validation.

A run file under `yamls/` is composed with Hydra (groups: size, objective, phase, dataset,
system), merged onto the `RunConfig` schema so that any unknown or misspelt key is an error that
names it and suggests the closest valid key, and returned as a typed object that the builders
read. `validated` is the one way any YAML of the project (run files, mixture files, recipes)
becomes a typed object, with the same checks and messages.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ettin.errors import UserError
from ettin.model.sizes import SIZES, ModelArgs, model_args

T = TypeVar("T")


class ConfigError(UserError):
    """A run configuration that cannot be used as written."""


def _choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    """OmegaConf has no Literal type: check a string choice ourselves, naming the valid ones."""
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}='{value}' is not one of {', '.join(choices)}{hint}")


@dataclass(kw_only=True)
class ModelConfig:
    size: str = "17m"
    """Size preset (see `ettin sizes`): 17m, 32m, 68m, 150m, 400m, 1b, demo, test."""
    num_layers: int | None = None
    """Override the preset's depth (tests and scaled-down runs)."""
    hidden_size: int | None = None
    """Override the preset's width."""
    intermediate_size: int | None = None
    """Override the preset's GLU width (Wi has 2x this many outputs)."""
    num_heads: int | None = None
    """Override the preset's head count (hidden_size must be a multiple of it)."""
    global_rope_theta: float = 10000.0
    """RoPE base of the global-attention layers (every third layer from layer 0)."""
    local_rope_theta: float = 10000.0
    """RoPE base of the sliding-window layers."""
    local_attention: int = 128
    """Total sliding window of local layers (encoder: +-64; decoder: self + 63 previous)."""
    causal_window: str = "hf"
    """Decoder local window rule: hf (self + 63 previous for 128: what an HF export computes) or
    reference (self + 64 previous: the reference training's window; set for a reference decoder
    resumed with `ettin import --resume-into`). Encoders: no difference."""
    attn_out_dropout: float = 0.1
    """Dropout after the attention output projection (the reference's only dropout)."""
    attn_impl: str = "auto"
    """Attention backend: auto (flash on CUDA if installed, else flex on CUDA, else torch), flash,
    flex (torch FlexAttention with a block mask), torch (exact SDPA path, the CPU oracle)."""

    def __post_init__(self) -> None:
        _choice("model.size", self.size, tuple(SIZES))
        _choice("model.attn_impl", self.attn_impl, ("auto", "flash", "flex", "torch"))
        _choice("model.causal_window", self.causal_window, ("hf", "reference"))
        try:
            self.model_args()
        except ValueError as err:  # ModelArgs names its fields as this section names its keys
            raise ConfigError(str(err).replace("ModelArgs.", "model.")) from None

    def model_args(self, **runtime: Any) -> ModelArgs:
        """The `ModelArgs` of this section: the size preset, its overrides and the attention
        settings; `runtime` adds what the run knows later (vocab_size, causal, pad_token_id)."""
        overrides = {
            k: getattr(self, k)
            for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads")
            if getattr(self, k) is not None
        }
        return model_args(
            self.size,
            **overrides,
            global_rope_theta=self.global_rope_theta,
            local_rope_theta=self.local_rope_theta,
            local_attention=self.local_attention,
            causal_window=self.causal_window,
            attn_out_dropout=self.attn_out_dropout,
            **runtime,
        )


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = "mlm"
    """mlm: bidirectional encoder, masked LM. clm: causal decoder, next-token LM."""
    mlm_probability: float = 0.30
    """Training masking rate (MLM only): 0.30 in phases 1-2, 0.15 in the decay phase."""
    eval_mlm_probability: float = 0.15
    """Masking rate on the held-out split (MLM only)."""

    def __post_init__(self) -> None:
        _choice("objective.name", self.name, ("mlm", "clm"))
        for name in ("mlm_probability", "eval_mlm_probability"):
            p = getattr(self, name)
            if not 0.0 < p < 1.0:
                raise ConfigError(f"objective.{name}={p} must be in (0, 1)")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_bytes(value: Any, where: str = "data.cache_limit", error: type = ValueError) -> int:
    """`500gb`, `1mb`, `16kb`, `4096` -> bytes (binary units, as Streaming's `bytes_to_int`)."""
    if isinstance(value, int) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(value).lower())
    if not m or float(m.group(1)) <= 0:
        raise error(f"{where}={value!r} is not a size: write e.g. 500gb, 64mb or 1048576 (bytes)")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2) if m.group(2) != "k" else "kb"])


@dataclass(kw_only=True)
class DataConfig:
    path: str = MISSING
    """Folder (or remote URI) of one phase's MDS shards, holding train/ and val/ (or validation/)
    splits; a split's shards may sit in per-source subfolders merged into its index.json."""
    local_cache: str | None = None
    """Local download folder when `path` is remote (s3://, gs://, ...)."""
    train_split: str = "train"
    """Sub-folder of `path` used for training."""
    eval_split: str | None = "val"
    """Sub-folder used for evaluation; null disables evaluation. `val` (what `ettin prep` writes)
    and `validation` (the published Ettin phases' name) stand for each other: when the one named
    is absent and the other is there, the other is used."""
    max_seq_len: int = 1024
    """Samples are truncated to this many tokens (BOS and, for encoders, EOS included)."""
    packing: bool = False
    """Pack several sequences per row instead of padding each to the longest."""
    shuffle_seed: int = 21
    """Seed of the global permutation (numpy PCG64DXSM(seed + epoch))."""
    order_file: str | None = None
    """Train on an order file (Parquet file or folder, local or remote) instead of the permutation:
    step k is the rows of its k-th step. With `sample_id` (`ettin order export`, the recorder) the
    ids index the shards; with `input_ids` (the published ettin-data-order: `step`, `input_ids`)
    the file is the data and no shards are read. A folder is searched recursively: the published
    tree (`checkpoint_NNNNNN/`, `ext_NNNNNN/`, `decay_NNNNNN/` of `steps_*.parquet`, steps
    restarting in each folder) is read with `order_phase`. See docs/architecture.md, "Data
    loading and order"."""
    order_phase: str | None = None
    """Which folders of an order-file tree to train on: `checkpoint`, `ext` or `decay` (every
    folder `<phase>_NNNNNN`), or a glob of folder names (`ext_00*`). Their parts are ordered by
    (folder, first step) and their steps renumbered into one sequence. null: the whole of
    `order_file` (refused if it holds several phases)."""
    skip_steps: list[list[int]] = field(default_factory=list)
    """Order steps never trained on: [[a, b], ...] drops a <= step < b (end excluded); the run
    trains the steps after them, its own step count going on. Merged with `<run_dir>/skip_steps.json`."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    batch_size_warmup_tokens: str = "0tok"
    """Grow the global batch from `batch_size_warmup_min` to the full size over this many tokens."""
    batch_size_warmup_min: int = 0
    """Smallest global batch (sequences) during batch-size warm-up."""
    order: str = "global"
    """global (default, the reference's): the PCG64DXSM permutation of `ettin.data.order`; it
    touches every shard from the first steps, so the whole split is fetched into `local_cache`
    (or read locally) before step 1. streaming: Streaming's own deterministic, elastic shuffle
    (`shuffle_algo`, `shuffle_block_size`, seeded by `shuffle_seed`), which downloads shards on
    demand and keeps at most `cache_limit` of them on disk: for splits a node cannot hold. Not
    the reference's order; no `order_file` replay nor batch-size warm-up."""
    cache_limit: str | None = None
    """data.order=streaming: most bytes of shards kept in `local_cache` (e.g. 500gb, 1mb);
    null keeps every shard fetched. At least 4x the largest shard (Streaming's rule)."""
    shuffle_algo: str = "py1e"
    """data.order=streaming: Streaming's shuffle (py1e, py1br, py1b, py1s, py2s, naive)."""
    shuffle_block_size: int | None = None
    """data.order=streaming: samples per shuffle block (null: Streaming's default, 262144 with
    one canonical node); larger mixes more, smaller needs fewer shards at once."""
    num_canonical_nodes: int | None = 1
    """data.order=streaming: Streaming's canonical nodes; the order is the same for every number of
    ranks and nodes as long as this stays the same (1 by default, so 1 GPU == 16 GPUs)."""

    def __post_init__(self) -> None:
        _choice("data.order", self.order, ("global", "streaming"))
        _choice(
            "data.shuffle_algo",
            self.shuffle_algo,
            ("py1e", "py1br", "py1b", "py1s", "py2s", "naive"),
        )
        if self.shuffle_block_size is not None and self.shuffle_block_size <= 0:
            raise ConfigError(f"data.shuffle_block_size={self.shuffle_block_size} must be positive")
        token_count(self.batch_size_warmup_tokens, "data.batch_size_warmup_tokens")
        if self.batch_size_warmup_min < 0 or self.num_workers < 0:
            raise ConfigError(
                "data.batch_size_warmup_min and data.num_workers must not be negative, got "
                f"{self.batch_size_warmup_min} and {self.num_workers}"
            )
        if self.cache_limit is not None:
            parse_bytes(self.cache_limit, "data.cache_limit", error=ConfigError)
        if self.order_phase is not None and not self.order_file:
            raise ConfigError(
                f"data.order_phase={self.order_phase} picks folders of data.order_file, which is "
                f"not set: give data.order_file=<the order tree's root> or drop data.order_phase"
            )
        if self.order == "streaming" and self.order_file:
            raise ConfigError(
                "data.order_file replays the global order; it cannot be combined with "
                "data.order=streaming (drop one of them)"
            )
        if self.order == "streaming" and self.skip_steps:
            raise ConfigError(
                "data.skip_steps removes steps of the global order; it cannot be combined with "
                "data.order=streaming (drop one of them)"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (StableAdamW)."""
    weight_decay: float = 3e-4
    """Decoupled weight decay, scaled by lr/peak lr; never applied to biases and norms."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""
    eps: float = 1e-6
    """Adam epsilon."""
    lr_scale: float = 1.0
    """Multiplier of `lr` in this phase (the decay phase and cross-objective runs use 0.5)."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(
                f"optim.betas must have two values, e.g. [0.9, 0.98]; got {self.betas}"
            )

    @property
    def peak_lr(self) -> float:
        """The peak learning rate of this run: lr x lr_scale (also StableAdamW's max_lr)."""
        return self.lr * self.lr_scale


@dataclass(kw_only=True)
class SchedulerConfig:
    t_warmup: str = "0tok"
    """Linear warm-up length (Composer time string, e.g. 3_000_000_000tok)."""
    t_decay: str = "0tok"
    """Decay length at the end of the run ('1dur' decays over the whole run)."""
    alpha_f: float = 0.0
    """Final LR as a fraction of the peak."""
    decay_shape: str = "linear"
    """Shape of the decay: linear, or 1 - sqrt (the reference's one_minus_sqrt)."""

    def __post_init__(self) -> None:
        _choice("scheduler.decay_shape", self.decay_shape, ("linear", "1-sqrt"))
        if not 0.0 <= self.alpha_f <= 1.0:
            raise ConfigError(f"scheduler.alpha_f={self.alpha_f} must be in [0, 1]")
        for name in ("t_warmup", "t_decay"):
            run_time(getattr(self, name), f"scheduler.{name}")


RUN_UNITS = ("tok", "ba", "sp", "ep", "dur")
"""Composer time units a config may use (not seconds nor iterations)."""


def run_time(value: str, where: str, units: tuple[str, ...] = RUN_UNITS) -> Any:
    """A config's Composer time string (`100ba`, `8_500_000_000tok`) as `Time`: in one of
    `units`, not negative, and at most the whole run when in `dur`."""
    from composer.core import Time  # Composer only when a config is checked

    try:
        time = Time.from_timestring(str(value))
    except ValueError:
        raise ConfigError(
            f"{where}={value!r} is not a Composer time string: write a number and one of "
            f"{', '.join(units)} (e.g. 100ba or 8_500_000_000tok)"
        ) from None
    if time.unit.value not in units:
        raise ConfigError(f"{where}={value!r}: use {', '.join(units)}, not {time.unit.value}")
    if time.value < 0:
        raise ConfigError(f"{where}={value!r} must not be negative")
    if time.unit.value == "dur" and time.value > 1:
        raise ConfigError(f"{where}={value!r} is longer than the run (at most 1dur)")
    return time


def token_count(value: str | int, where: str) -> int:
    """A number of tokens: a time string in tokens ('50_000_000tok') or an int."""
    if isinstance(value, int) and value >= 0:
        return value
    return int(run_time(value, where, ("tok",)).value)


@dataclass(kw_only=True)
class CallbacksConfig:
    speed_window: int = 100
    """Batches averaged by the throughput/MFU monitor."""
    grad_norm_interval: int = 100
    """Log the gradient norm over all parameters every N batches (0 disables)."""
    record_order: bool = True
    """Record the sample ids consumed at each step (Parquet in the run folder)."""
    export_hf: bool = True
    """Export the final model in the Hugging Face format to <run_dir>/hf."""
    loss_spike_window: int = 0
    """Loss-spike/NaN guard (`ettin.callbacks.loss_spike`): median of the last N step losses
    (0 disables the guard; a NaN/inf loss is caught whenever it is on)."""
    loss_spike_ratio: float = 3.0
    """A step loss above ratio x that running median is a spike."""
    loss_spike_action: str = "stop"
    """stop: save a checkpoint and stop the run. rewind: record the step in
    <run_dir>/skip_steps.json and stop without saving, so rerunning the same command resumes from
    the last checkpoint and the data order skips that step (`ettin.data.skips`); rewind needs
    data.order=global."""

    def __post_init__(self) -> None:
        _choice("callbacks.loss_spike_action", self.loss_spike_action, ("stop", "rewind"))
        if self.speed_window < 1 or self.grad_norm_interval < 0:
            raise ConfigError(
                "callbacks.speed_window must be >= 1 and callbacks.grad_norm_interval >= 0, got "
                f"{self.speed_window} and {self.grad_norm_interval}"
            )
        if self.loss_spike_window < 0 or self.loss_spike_ratio <= 1.0:
            raise ConfigError(
                "callbacks.loss_spike_window must be >= 0 and callbacks.loss_spike_ratio > 1, got "
                f"{self.loss_spike_window} and {self.loss_spike_ratio}"
            )


@dataclass(kw_only=True)
class LoggingConfig:
    console_interval: str = "100ba"
    """How often the console logger prints."""
    file: bool = True
    """Write metrics as JSON lines to <run_dir>/metrics.jsonl."""
    progress_bar: bool = False
    """Show a progress bar (Composer's) instead of periodic console lines."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (requires `pip install wandb`)."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    tensorboard: bool = False
    """Log to TensorBoard in <run_dir>/tensorboard."""
    mlflow_experiment: str | None = None
    """Log to MLflow under this experiment name."""


@dataclass(kw_only=True)
class RunConfig:
    run_name: str = MISSING
    """Name of the run; also the default run folder runs/<run_name>."""
    runs_root: str = "runs"
    """Folder holding one folder per run; run files find their predecessors here (`init_from`)."""
    run_dir: str = "${runs_root}/${run_name}"
    """Folder for checkpoints, metrics, the data order and the exported model."""
    seed: int = 21
    """Seed for the model init and the MLM masks."""
    data_root: str = "data/sotu"
    """Folder with one prepared sub-folder per phase (pretrain, extension, decay); see `ettin prep`."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub name; null = the offline-built Ettin tokenizer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    global_train_batch_size: int = 4608
    """Sequences per optimiser step, over all ranks."""
    device_train_microbatch_size: int = 16
    """Sequences per forward/backward on one device (gradient accumulation fills the rest)."""
    global_eval_batch_size: int = 1024
    """Sequences per evaluation batch, over all ranks."""
    max_duration: str = "1_700_000_000_000tok"
    """Length of this phase (tokens are real, non-padding tokens)."""
    eval_interval: str = "1dur"
    """How often to evaluate (the end of the run is always evaluated)."""
    eval_subset_num_batches: int = -1
    """Evaluate on at most this many batches (-1 = the whole split)."""
    save_interval: str = "8_500_000_000tok"
    """Checkpoint every so often (and at the end)."""
    save_num_checkpoints_to_keep: int = -1
    """Keep only the newest N checkpoints (-1 keeps all)."""
    save_step0: bool = False
    """Also save the untrained model (batch 0, `ep0-ba0-rank0.pt`) before the first step."""
    autoresume: bool = True
    """Resume from the newest checkpoint in <run_dir>/checkpoints, keeping time, optimiser, data position."""
    init_from: str | None = None
    """Start from these weights only (phase transition or cross-objective): fresh time and optimiser."""
    precision: str = "auto"
    """auto = amp_bf16 on GPU, fp32 on CPU."""
    parallelism: str = "ddp"
    """ddp (default) or fsdp (FSDP2: each block and the root fully sharded, for the large sizes)."""
    fsdp_param_dtype: str = "fp32"
    """FSDP: dtype the parameters are all-gathered and computed in: fp32 (DDP's numerics; autocast
    still runs matmuls in bf16) or bf16 (half the all-gather traffic, bf16 residual stream)."""
    fsdp_reduce_dtype: str = "fp32"
    """FSDP: dtype of the gradient reduce-scatter: fp32 (as DDP) or bf16 (the reference's PURE)."""
    compile: bool = False
    """torch.compile each transformer block (see docs/architecture.md, "The GPU path")."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
    deterministic: bool = False
    """Bit-deterministic kernels where the backends offer them (flash-attn's deterministic
    backward, torch deterministic algorithms); slower on GPU, no effect on the CPU paths."""

    def __post_init__(self) -> None:
        _choice("precision", self.precision, ("auto", "fp32", "amp_bf16"))
        _choice("parallelism", self.parallelism, ("ddp", "fsdp"))
        _choice("fsdp_param_dtype", self.fsdp_param_dtype, ("fp32", "bf16"))
        _choice("fsdp_reduce_dtype", self.fsdp_reduce_dtype, ("fp32", "bf16"))
        if self.device_train_microbatch_size <= 0 or self.global_train_batch_size <= 0:
            raise ConfigError("batch sizes must be positive")
        shortest = 3 if self.objective.name == "mlm" else 2  # BOS, a token (and EOS for MLM)
        if self.data.max_seq_len < shortest:
            raise ConfigError(
                f"data.max_seq_len={self.data.max_seq_len} is too short for objective="
                f"{self.objective.name}: a sample needs at least {shortest} tokens"
            )
        duration = run_time(self.max_duration, "max_duration", ("tok", "ba", "sp", "ep"))
        run_time(self.save_interval, "save_interval")
        run_time(self.eval_interval, "eval_interval")
        decay = run_time(self.scheduler.t_decay, "scheduler.t_decay")
        if decay.value > 0 and decay.unit.value not in ("dur", duration.unit.value):
            raise ConfigError(
                f"scheduler.t_decay={self.scheduler.t_decay} is in {decay.unit.value} but "
                f"max_duration={self.max_duration} is in {duration.unit.value}: give t_decay in "
                "the same unit or as a fraction of the run ('0.2dur')"
            )
        c = self.callbacks
        if (
            c.loss_spike_window > 0
            and c.loss_spike_action == "rewind"
            and self.data.order == "streaming"
        ):
            raise ConfigError(
                "callbacks.loss_spike_action=rewind skips steps of the global order, which "
                "data.order=streaming does not have (it would rewind nothing): use "
                "callbacks.loss_spike_action=stop, or data.order=global"
            )


def yamls_root() -> Path:
    """The bundled config tree (`yamls/` at the repository root)."""
    env = os.environ.get("ETTIN_YAMLS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "yamls"


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field annotation holds directly or as `X | None`; None otherwise."""
    if is_dataclass(hint):
        return hint
    return next((a for a in get_args(hint) if is_dataclass(a)), None)


# Keys of other tools' configs that people carry over, refused with what to use instead.
REFUSED_KEYS = {
    "compile_config": (
        "whole-model torch.compile (Composer's compile_config) is not supported: unpadding has "
        "data-dependent shapes (the token count, cu_seqlens) that inductor cannot compile, so the "
        "model would graph-break into eager pieces; set compile=true instead (each transformer "
        "block compiled, see docs/architecture.md, 'The GPU path')"
    ),
}


def unknown_key_message(full_key: str, schema: type | None = None) -> str:
    """'unknown config key X; did you mean Y? Valid keys under Z: ...' for a dotted key.

    Walks `schema` (default RunConfig) down the key; a `dict[str, Dataclass]` field (a mixture's
    `phases`, `sources`, `mix`) takes the next part as a free name.
    """
    node: Any = schema or RunConfig
    if node is RunConfig and full_key in REFUSED_KEYS:
        return f"config key '{full_key}' is refused: {REFUSED_KEYS[full_key]}"
    parts = full_key.split(".")
    depth = 0
    while depth < len(parts):
        own = {f.name for f in fields(node)}
        part = parts[depth]
        if part in own and depth < len(parts) - 1:
            hint = get_type_hints(node)[part]
            if get_origin(hint) is dict and is_dataclass(get_args(hint)[1]):
                node, depth = get_args(hint)[1], depth + 2
                continue
            if _dataclass_in(hint):
                node, depth = _dataclass_in(hint), depth + 1
                continue
        prefix = ".".join(parts[:depth])
        msg = f"unknown config key '{full_key}'"
        close = difflib.get_close_matches(part, sorted(own), n=1, cutoff=0.5)
        if close:
            msg += f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
        valid = ", ".join(f.name for f in fields(node))
        return msg + f" Valid keys under '{prefix or '<top>'}': {valid}"
    return f"unknown config key '{full_key}'"


def _build_parts(node: DictConfig, schema: type, where: str, error: type[Exception]) -> None:
    """Build each entry of the schema's `dict[str, Dataclass]` fields first, innermost first, so
    that a failed `__post_init__` check names the entry ('phases.short: ...')."""
    for f in fields(schema):
        hint = get_type_hints(schema)[f.name]
        if get_origin(hint) is not dict or not is_dataclass(get_args(hint)[1]):
            continue
        for name, entry in node[f.name].items():
            here = f"{where}{f.name}.{name}"
            _build_parts(entry, get_args(hint)[1], here + ".", error)
            try:
                OmegaConf.to_object(entry)
            except ValueError as err:
                raise error(f"{here}: {err}") from None


def validated(
    schema: type[T], raw: Any, where: str = "", error: type[Exception] = ConfigError
) -> T:
    """`raw` (a mapping or OmegaConf node) merged onto the dataclass `schema`, resolved, checked
    (`__post_init__`) and built: the one way every YAML of the project becomes a typed object.

    Every failure raises `error` naming `where` (a file) and the key: unknown keys with the
    closest valid one, missing required keys, values of the wrong type, failed checks.
    """
    pre = f"{where}: " if where else ""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise error(f"{pre}required key not set: {', '.join(repr(k) for k in missing)}")
        _build_parts(merged, schema, pre, error)
        return OmegaConf.to_object(merged)
    except error:
        raise
    except ConfigKeyError as err:
        raise error(pre + unknown_key_message(str(err.full_key), schema)) from None
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise error(f"{pre}bad value at '{err.full_key}': {reason}") from None
    except ValueError as err:  # a __post_init__ check of the top-level schema
        raise error(f"{pre}{err}") from None


def _find_root(path: Path) -> Path:
    """The config tree a run file belongs to: the nearest ancestor holding base.yaml."""
    for parent in path.resolve().parents:
        if (parent / "base.yaml").exists():
            return parent
    return path.resolve().parent


def _split_overrides(root: Path, overrides: list[str]) -> tuple[list[str], list[str]]:
    """Group choices (`objective=clm`) go to Hydra; plain keys (`optim.lr=1e-3`) onto the schema."""
    groups, keys = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not key=value (e.g. optim.lr=1e-3 or objective=clm)"
            )
        name = item.split("=", 1)[0].lstrip("+~")
        (groups if (root / name).is_dir() else keys).append(item)
    return groups, keys


def compose(path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """Compose a run file with Hydra, then apply `key=value` overrides (untyped result)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file not found: {file}")
    root = _find_root(file)
    name = str(file.resolve().relative_to(root).with_suffix(""))
    groups, keys = _split_overrides(root, list(overrides or []))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=groups)
    except HydraException as err:
        raise ConfigError(f"{file}: {err}".split("\nConfig search path")[0]) from err
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([k.lstrip("+") for k in keys]))


def to_run_config(raw: DictConfig | dict) -> RunConfig:
    """Validate an untyped config against the schema and return the typed RunConfig."""
    return validated(RunConfig, raw)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Compose, validate and return a run config."""
    return to_run_config(compose(path, overrides))


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
