"""Checkpoints of the reference training (FlexBert on Composer) -> ettin: weights, optimiser, time.

The published raw checkpoints (`jhu-clsp/ettin-checkpoints`) are Composer run checkpoints of
the reference code (docs/architecture.md, "Reference checkpoints"; reference recipe §6.1):
`state.model` holds `FlexBertFor{MaskedLM,CausalLM}` inside Composer's `HuggingFaceModel`
(keys `model.bert....`, `model.head.*` or `model.lm_head.*`, `model.decoder.*`),
`state.optimizers` bert24's StableAdamW state, `state.timestamp` the run's position and
`state.integrations.huggingface` the FlexBertConfig (and the tokenizer files). This module is the
format: it converts state dicts and configs and knows nothing of trainers.

- `read_reference(path)`: weights under our names, `ModelArgs` from the FlexBertConfig (a decoder
  gets the reference's causal window), the optimiser moments per parameter, the timestamp, the
  tokenizer files.
- `reference_weights(payload)`: what `ettin.interop.formats.read_any_checkpoint` returns for a
  reference checkpoint, so `init_from=ref.pt` and `ettin export ref.pt` accept one as is.
- `load_optimizer_state(optimizer, model, ref)`: the reference's StableAdamW state as
  torch-optimi StableAdamW state (what is equivalent; what is dropped is said, `OPTIMIZER_MAP`).

Continuing a reference run with our trainer (`ettin import --resume-into`) is `ettin.resume`.
Nothing is guessed silently: an unknown tensor, a missing one, a shape that does not fit the
config, an optimiser state we cannot represent is refused with a message that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ettin.errors import CheckpointError
from ettin.model import ModelArgs

log = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZER_MAP",
    "ReferenceCheckpoint",
    "ReferenceFormatError",
    "ettin_name",
    "is_reference_state",
    "load_optimizer_state",
    "read_reference",
    "reference_model_args",
    "reference_tokenizer",
    "reference_weights",
    "write_tokenizer",
]


class ReferenceFormatError(CheckpointError):
    """A reference checkpoint that cannot be converted as asked (the message says why)."""


# FlexBert name (after Composer's `model.` prefix) -> ours. Layer 0 has no attn_norm in either.
_LAYER_LEAVES = ("attn_norm", "attn.Wqkv", "attn.Wo", "mlp_norm", "mlp.Wi", "mlp.Wo")
_RULES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"^bert\.embeddings\.(tok_embeddings|norm)\.weight$"),
        r"model.embeddings.\1.weight",
    ),
    (
        re.compile(
            r"^bert\.encoder\.layers\.(\d+)\.("
            + "|".join(re.escape(x) for x in _LAYER_LEAVES)
            + r")\.weight$"
        ),
        r"model.layers.\1.\2.weight",
    ),
    (re.compile(r"^bert\.final_norm\.weight$"), "model.final_norm.weight"),
    (re.compile(r"^(?:head|lm_head)\.(dense|norm)\.weight$"), r"head.\1.weight"),
    (re.compile(r"^decoder\.(weight|bias)$"), r"decoder.\1"),
]
_TIED = "decoder.weight"


def ettin_name(key: str) -> str:
    """Our state-dict name of a reference `state.model` key (`model.bert.…` -> `model.…`)."""
    name = key.replace("_orig_mod.", "")
    if not name.startswith("model."):
        raise ReferenceFormatError(
            f"reference checkpoint tensor {key!r} lacks Composer's 'model.' prefix: this is not a "
            "Composer checkpoint of the reference FlexBert models"
        )
    name = name[len("model.") :]
    for pattern, target in _RULES:
        if pattern.match(name):
            out = pattern.sub(target, name)
            if out == "model.layers.0.attn_norm.weight":
                raise ReferenceFormatError(
                    f"reference checkpoint has {key!r}: layer 0 with its own attention norm "
                    "(skip_first_prenorm=false) is not the Ettin architecture"
                )
            return out
    raise ReferenceFormatError(
        f"unknown tensor {key!r} in the reference checkpoint: it has no place in the Ettin "
        "architecture (biases, position embeddings or another head are not part of it); "
        "only FlexBert prenorm/GLU/RoPE checkpoints of the Ettin configs can be imported"
    )


def is_reference_state(state: dict[str, Any]) -> bool:
    """Whether a Composer `state` holds a reference FlexBert model (keys `model.bert.…`)."""
    model = state.get("model") if isinstance(state, dict) else None
    return isinstance(model, dict) and any(
        isinstance(k, str) and k.replace("_orig_mod.", "").startswith("model.bert.") for k in model
    )


def _hf_integration(state: dict[str, Any]) -> dict[str, Any]:
    return ((state.get("integrations") or {}).get("huggingface")) or {}


def _flex_config(state: dict[str, Any], source: str) -> dict[str, Any]:
    model = _hf_integration(state).get("model") or {}
    config = (model.get("config") or {}).get("content")
    if not isinstance(config, dict):
        raise ReferenceFormatError(
            f"{source}: no model config in state.integrations.huggingface.model.config.content "
            "(Composer's HuggingFaceModel metadata); the model's shape cannot be read"
        )
    return config


# FlexBertConfig fields whose value the Ettin architecture fixes: (field, required value).
_FIXED_FLEX = {
    "attn_qkv_bias": False,
    "attn_out_bias": False,
    "mlp_in_bias": False,
    "mlp_out_bias": False,
    "head_pred_bias": False,
    "decoder_bias": True,
    "hidden_act": "gelu",
    "head_pred_act": "gelu",
    "normalization": "layernorm",
    "mlp_layer": "glu",
    "bert_layer": "prenorm",
    "embedding_layer": "sans_pos",
    "embed_norm": True,
    "final_norm": True,
    "skip_first_prenorm": True,
    "rotary_emb_interleaved": False,
    "tie_word_embeddings": True,
}


def reference_model_args(
    config: dict[str, Any], *, causal: bool | None = None, source: str = "reference checkpoint"
) -> ModelArgs:
    """`ModelArgs` from a FlexBertConfig dict (as Composer stores it in the checkpoint).

    `causal` is what the tensors say (`lm_head` = decoder); the config's `causal_mask` must agree.
    `local_attn_rotary_emb_base` -1 (or absent) means the global base; `sliding_window` is the total
    window (ours `local_attention`); -1 there (with `global_attn_every_n_layers` -1) means every
    layer is global. A window with `global_attn_every_n_layers` <= 0 (FlexBert: every layer local)
    and `global_attn_every_n_layers` > 0 without a window (FlexBert refuses it) are refused.
    """
    for key, want in _FIXED_FLEX.items():
        if key in config and config[key] != want:
            raise ReferenceFormatError(
                f"{source}: FlexBertConfig {key}={config[key]!r} is not the Ettin architecture "
                f"({key}={want!r}); this checkpoint cannot be represented"
            )
    norm = config.get("norm_kwargs") or {}
    if norm.get("bias", False):
        raise ReferenceFormatError(
            f"{source}: norm_kwargs.bias=true (Ettin LayerNorms have no bias)"
        )
    cfg_causal = config.get("causal_mask")
    if causal is None:
        causal = bool(cfg_causal)
    elif cfg_causal is not None and bool(cfg_causal) != causal:
        kind = "lm_head (a decoder)" if causal else "head (an encoder)"
        raise ReferenceFormatError(
            f"{source}: the tensors name {kind} but the config says causal_mask={cfg_causal}; "
            "the checkpoint is inconsistent"
        )
    missing = [
        k
        for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
        if k not in config
    ]
    if missing:
        raise ReferenceFormatError(f"{source}: FlexBertConfig lacks {', '.join(missing)}")
    window = config.get("sliding_window", -1)
    every_n = config.get("global_attn_every_n_layers", -1)
    window = -1 if window is None or window <= 0 else window
    every_n = -1 if every_n is None or every_n <= 0 else every_n
    if window > 0 and every_n <= 0:
        # FlexBert: global_attn_every_n_layers <= 0 with a window makes *every* layer local
        raise ReferenceFormatError(
            f"{source}: FlexBertConfig global_attn_every_n_layers="
            f"{config.get('global_attn_every_n_layers')} with sliding_window={window} makes every "
            f"layer local (window {window}), which the Ettin architecture cannot represent: layer "
            f"i is global iff i % global_attn_every_n_layers == 0, so layer 0 always is, and "
            f"Hugging Face's ModernBERT has no all-local form either. This checkpoint cannot be "
            f"imported as it was trained"
        )
    if window <= 0 and every_n > 0:
        raise ReferenceFormatError(
            f"{source}: FlexBertConfig global_attn_every_n_layers={every_n} needs a sliding_window "
            f"(it has {config.get('sliding_window')}); FlexBert itself refuses this config"
        )
    if window <= 0:
        window, every_n = 128, 1  # every layer global: the window is never used
    global_theta = float(config.get("rotary_emb_base", 10000.0))
    local_theta = config.get("local_attn_rotary_emb_base", -1)
    local_theta = global_theta if local_theta in (None, -1) else float(local_theta)
    try:
        return ModelArgs(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_heads=int(config["num_attention_heads"]),
            vocab_size=int(config.get("vocab_size", 50368)),
            causal=causal,
            global_attn_every_n_layers=int(every_n),
            local_attention=int(window),
            # flash (w/2, w/2) + causal: one key more than HF's decoder rule (ModelArgs docs)
            causal_window="reference" if causal else "hf",
            global_rope_theta=global_theta,
            local_rope_theta=local_theta,
            norm_eps=float(norm.get("eps", config.get("norm_eps", 1e-5))),
            init_std=float(config.get("init_std", 0.02)),
            init_cutoff_factor=float(config.get("init_cutoff_factor", 2.0) or 2.0),
        )
    except ValueError as err:
        raise ReferenceFormatError(f"{source}: {err}") from None


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint, converted to our names."""

    source: str
    model_args: ModelArgs
    state: dict[str, Tensor]
    """Model weights under our names (the tied `decoder.weight` included as stored)."""
    config: dict[str, Any]
    """The FlexBertConfig as stored."""
    timestamp: dict[str, Any] = field(default_factory=dict)
    """Composer timestamp fields (batch, sample, token, epoch, *_in_epoch)."""
    moments: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """Our parameter name -> {"exp_avg", "exp_avg_sq"[, "eps_sq"]} (empty: no optimiser state)."""
    steps: dict[str, int] = field(default_factory=dict)
    """Our parameter name -> StableAdamW's step counter for it."""
    optimizer_groups: list[dict[str, Any]] = field(default_factory=list)
    """The reference's param_groups without `params` (hyper-parameters, for the record)."""
    optimizer_notes: list[str] = field(default_factory=list)
    """Per-parameter states not carried as is (`kahan_comp` folded, `mean_square` dropped)."""
    tokenizer_files: dict[str, Any] = field(default_factory=dict)
    """Composer's tokenizer metadata: file name -> {"file_extension", "content"}."""
    run_name: str | None = None

    @property
    def objective(self) -> str:
        return "clm" if self.model_args.causal else "mlm"

    @property
    def kind(self) -> str:
        return "decoder (CLM)" if self.model_args.causal else "encoder (MLM)"


def _load(path: str | os.PathLike) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ReferenceFormatError(f"cannot read checkpoint {path}: {err}") from err
    if not (isinstance(payload, dict) and isinstance(payload.get("state"), dict)):
        raise ReferenceFormatError(f"{path} is not a Composer checkpoint (no 'state')")
    return payload


def _weights(state: dict[str, Any], source: str) -> tuple[dict[str, Tensor], bool]:
    model = state.get("model")
    if not isinstance(model, dict) or not model:
        raise ReferenceFormatError(f"{source}: no model weights in state.model")
    out: dict[str, Tensor] = {}
    heads = set()
    for key, tensor in model.items():
        name = ettin_name(key)
        bare = key.replace("_orig_mod.", "")[len("model.") :]
        if bare.startswith(("head.", "lm_head.")):
            heads.add(bare.split(".")[0])
        if name in out:
            raise ReferenceFormatError(f"{source}: two tensors map to {name!r} (one is {key!r})")
        out[name] = tensor
    if heads == {"head", "lm_head"}:
        raise ReferenceFormatError(f"{source}: holds both head.* and lm_head.*; which model is it?")
    if not heads:
        raise ReferenceFormatError(
            f"{source}: no prediction head (model.head.* for an encoder, model.lm_head.* for a "
            "decoder); only the MaskedLM/CausalLM checkpoints can be imported"
        )
    return out, heads == {"lm_head"}


def _timestamp(state: dict[str, Any]) -> dict[str, Any]:
    stamp = state.get("timestamp") or {}
    if isinstance(stamp, dict):
        stamp = stamp.get("Timestamp", stamp)
    return dict(stamp) if isinstance(stamp, dict) else {}


def _flex_param_order(model: dict[str, Tensor]) -> list[tuple[str, bool]]:
    """(reference key, is no-decay) in the reference's `named_parameters` order (tie once)."""
    out = []
    for key, tensor in model.items():
        if ettin_name(key) == _TIED:
            continue  # tied to the embedding: one parameter
        out.append((key, tensor.ndim <= 1 or key.endswith(".bias")))  # optimizer.param_groups
    return out


OPTIMIZER_MAP: dict[str, str] = {
    "exp_avg": "kept: the same debiased first moment (bert24's StableAdamW is optimi's)",
    "exp_avg_sq": "kept: the same debiased second moment",
    "step": "kept: the group's step counter (a per-parameter one must be equal within a group)",
    "eps_sq": "recomputed from our eps (warned when the reference's eps^2 differs)",
    "kahan_comp": "folded into the fp32 weight (weight + compensation); none for fp32 params",
    "mean_square": "dropped (optimi's optional state, not used by StableAdamW here; warned)",
}
"""bert24 StableAdamW per-parameter state -> torch-optimi StableAdamW state, key by key."""
_GROUP_CHECKED = ("beta1", "beta2", "eps", "weight_decay", "decouple_lr")
"""Group hyper-parameters compared with ours on import (ours win; a difference is warned)."""


def _optimizer(
    state: dict[str, Any], weights: dict[str, Tensor], source: str
) -> tuple[dict[str, dict[str, Tensor]], dict[str, int], list[dict[str, Any]], list[str]]:
    """(moments, steps, group metadata, notes) of the reference's optimizer; folds Kahan buffers
    into `weights` in place."""
    optimizers = state.get("optimizers") or {}
    if not optimizers:
        return {}, {}, [], []
    if len(optimizers) != 1:
        raise ReferenceFormatError(
            f"{source}: {len(optimizers)} optimizers ({', '.join(optimizers)}); expected one StableAdamW"
        )
    ((opt_name, opt),) = optimizers.items()
    if "adam" not in opt_name.lower():
        raise ReferenceFormatError(
            f"{source}: optimizer {opt_name} is not StableAdamW; cannot map it"
        )
    per_param = opt.get("state") or {}
    groups = opt.get("param_groups") or []
    order = _flex_param_order(state["model"])
    names_of_int: dict[int, str] = {}
    if any(isinstance(k, int) for k in per_param) or any(
        isinstance(p, int) for g in groups for p in g.get("params", [])
    ):
        # torch's native optimizer.state_dict(): ids count through the groups in order; the
        # groups are built like ours (no-decay, then decay) in named_parameters order.
        flat = [p for g in groups for p in g.get("params", [])]
        by_group = [[k for k, nd in order if nd], [k for k, nd in order if not nd]]
        if len(groups) != 2 or [len(g["params"]) for g in groups] != [len(x) for x in by_group]:
            raise ReferenceFormatError(
                f"{source}: optimizer groups hold {[len(g.get('params', [])) for g in groups]} "
                f"parameters, expected {[len(x) for x in by_group]} (no-decay, decay) for this model"
            )
        names_of_int = dict(zip(flat, by_group[0] + by_group[1]))
    moments: dict[str, dict[str, Tensor]] = {}
    steps: dict[str, int] = {}
    group_of: dict[str, int] = {}
    notes: set[str] = set()
    for gi, group in enumerate(groups):
        for p in group.get("params", []):
            key = names_of_int.get(p, p) if isinstance(p, int) else p
            group_of[ettin_name(key)] = gi
    for key, entry in per_param.items():
        ref_key = names_of_int.get(key, key) if isinstance(key, int) else key
        if not isinstance(ref_key, str):
            raise ReferenceFormatError(
                f"{source}: optimizer state for unknown parameter id {key!r}"
            )
        name = ettin_name(ref_key)
        extra = set(entry) - set(OPTIMIZER_MAP)
        if extra:
            raise ReferenceFormatError(
                f"{source}: optimizer state of {ref_key!r} has {sorted(extra)}, which StableAdamW "
                "here does not keep; cannot carry it"
            )
        if "exp_avg" not in entry or "exp_avg_sq" not in entry:
            raise ReferenceFormatError(
                f"{source}: optimizer state of {ref_key!r} lacks exp_avg/exp_avg_sq"
            )
        target = weights.get(name)
        for m in ("exp_avg", "exp_avg_sq"):
            if target is not None and tuple(entry[m].shape) != tuple(target.shape):
                raise ReferenceFormatError(
                    f"{source}: optimizer {m} of {ref_key!r} has shape {tuple(entry[m].shape)}, "
                    f"the parameter {tuple(target.shape)}"
                )
        kahan = entry.get("kahan_comp")
        if isinstance(kahan, Tensor) and target is not None and kahan.shape == target.shape:
            # bert24 keeps bf16 parameters' rounding error here: the true value is p + comp
            weights[name] = target.float() + kahan.float()
            if name == "model.embeddings.tok_embeddings.weight" and _TIED in weights:
                weights[_TIED] = weights[name]
            notes.add("kahan_comp")
        if "mean_square" in entry:
            notes.add("mean_square")
        moments[name] = {"exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"]}
        if isinstance(entry.get("eps_sq"), Tensor | float):
            moments[name]["eps_sq"] = torch.as_tensor(entry["eps_sq"])
        step = entry.get("step")
        if step is None and name in group_of:
            step = groups[group_of[name]].get("step")
        if step is None:
            raise ReferenceFormatError(
                f"{source}: no step counter for {ref_key!r} (param or group)"
            )
        steps[name] = int(step.item() if isinstance(step, Tensor) else step)
    meta = [  # hyper-parameters, and our names of the group's params (checked against ours)
        {
            **{k: v for k, v in g.items() if k != "params"},
            "_ettin_params": sorted(n for n, at in group_of.items() if at == gi),
        }
        for gi, g in enumerate(groups)
    ]
    return moments, steps, meta, sorted(notes)


def load_optimizer_state(optimizer, model, ref: ReferenceCheckpoint) -> int:
    """Put the reference's StableAdamW state into our (not yet stepped) torch-optimi StableAdamW.

    Per parameter (`OPTIMIZER_MAP`): `exp_avg`, `exp_avg_sq` and the group's `step` are the same
    quantities in both (bert24's optimizer is optimi's with grad-norm logging), so they are
    copied; `eps_sq` is set from our eps, `kahan_comp` to None (our weights are fp32; a reference
    compensation was folded into the weight by `read_reference`). The group hyper-parameters
    (betas, eps, weight decay, decouple_lr) come from our run config; each that differs from the
    reference's, and each state that is dropped, is warned. Returns the step counter.
    """
    by_param = {id(p): name for name, p in model.named_parameters()}
    step_of_group = []
    said: list[str] = [f"{k} ({OPTIMIZER_MAP[k]})" for k in ref.optimizer_notes]
    for gi, group in enumerate(optimizer.param_groups):
        names = [by_param[id(p)] for p in group["params"]]
        missing = [n for n in names if n not in ref.moments]
        if missing:
            raise ReferenceFormatError(
                f"{ref.source}: no optimizer state for {missing[:5]}; resume weights only with "
                f"init_from={ref.source} instead"
            )
        theirs_group = ref.optimizer_groups[gi] if gi < len(ref.optimizer_groups) else {}
        if theirs_group:
            theirs = set(theirs_group.get("_ettin_params", names))
            moved = sorted(set(names) - theirs)
            if moved:
                raise ReferenceFormatError(
                    f"{ref.source}: {moved[:3]} are in another weight-decay group in the reference "
                    "optimizer than in ours; the parameter groups differ"
                )
            for key in _GROUP_CHECKED:  # optimi's group keys: beta1, beta2, eps, ...
                if key in theirs_group and group.get(key) is not None:
                    a, b = theirs_group[key], group[key]
                    if (float(a) != float(b)) if isinstance(a, int | float) else a != b:
                        said.append(f"group {gi} {key} {a} (ours {b}, from the run config)")
        steps = {ref.steps[n] for n in names}
        if len(steps) != 1:
            raise ReferenceFormatError(
                f"{ref.source}: the parameters of group {gi} have different step counters "
                f"{sorted(steps)}; StableAdamW here keeps one per group"
            )
        (step,) = steps
        eps_sq = group["eps"] ** 2
        for p, name in zip(group["params"], names):
            theirs_eps = ref.moments[name].get("eps_sq")
            if theirs_eps is not None and not math.isclose(float(theirs_eps), eps_sq, rel_tol=1e-2):
                said.append(f"{name} eps_sq {float(theirs_eps):.3g} (ours {eps_sq:.3g})")
            st = optimizer.state[p]
            st["exp_avg"] = ref.moments[name]["exp_avg"].to(p.dtype).clone().contiguous()
            st["exp_avg_sq"] = ref.moments[name]["exp_avg_sq"].to(p.dtype).clone().contiguous()
            st["eps_sq"] = torch.tensor(eps_sq, dtype=p.dtype, device=p.device)
            st["kahan_comp"] = None
        group["setup"] = True
        group["step"] = torch.tensor(step, dtype=torch.int32)
        step_of_group.append(step)
    if said:
        warnings.warn(
            f"{ref.source}: reference optimizer state not carried as is: {'; '.join(said[:6])}"
            + (f" (+{len(said) - 6} more)" if len(said) > 6 else ""),
            stacklevel=2,
        )
    return max(step_of_group) if step_of_group else 0


def read_reference(path: str | os.PathLike, *, payload: dict | None = None) -> ReferenceCheckpoint:
    """Read a reference Composer checkpoint into our names (see the module docstring)."""
    source = str(path)
    payload = payload if payload is not None else _load(path)
    state = payload["state"]
    if not is_reference_state(state):
        raise ReferenceFormatError(
            f"{source}: state.model has no 'model.bert.*' tensors: not a reference FlexBert checkpoint"
        )
    weights, causal = _weights(state, source)
    config = _flex_config(state, source)
    args = reference_model_args(config, causal=causal, source=source)
    moments, steps, groups, notes = _optimizer(state, weights, source)
    return ReferenceCheckpoint(
        source=source,
        model_args=args,
        state=weights,
        config=config,
        timestamp=_timestamp(state),
        moments=moments,
        steps=steps,
        optimizer_groups=groups,
        optimizer_notes=notes,
        tokenizer_files=dict(_hf_integration(state).get("tokenizer") or {}),
        run_name=state.get("run_name"),
    )


def write_tokenizer(files: dict[str, Any], out_dir: str | os.PathLike) -> Path | None:
    """Write Composer's tokenizer metadata back as files (None when there is none).

    Composer's `HuggingFaceModel.get_metadata` stores each file of `save_pretrained` under its
    name: `.json` parsed, `.txt` as a list of lines, `.py`/`.jinja` as text, `.model`
    (SentencePiece) as the serialized bytes; a name without its extension gets it appended."""
    if not files:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        content, ext = entry.get("content"), entry.get("file_extension", Path(name).suffix)
        base = Path(name).name
        target = out / (base if base.endswith(ext) else base + ext)
        if ext == ".json":
            target.write_text(json.dumps(content, ensure_ascii=False))
        elif ext == ".txt":
            target.write_text("\n".join(content) if isinstance(content, list) else str(content))
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(str(content))
    return out


def reference_tokenizer(files: dict[str, Any]) -> Path | None:
    """The folder of the tokenizer a reference checkpoint carries (None when it has none).

    Written once into the cache (`<cache>/tokenizers/reference-<digest of the files>`), so that
    `ettin export REF.pt OUT` and `init_from=REF.pt` find it like a run's tokenizer folder."""
    if not files:
        return None
    from ettin.cache import cache_root

    blob = json.dumps(files, sort_keys=True, default=repr).encode()
    out = cache_root() / "tokenizers" / f"reference-{hashlib.sha256(blob).hexdigest()[:16]}"
    if not out.is_dir():
        tmp = out.with_name(f".{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_tokenizer(files, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process put it there first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def reference_weights(payload: dict[str, Any], source: str) -> tuple[dict[str, Tensor], dict]:
    """(our state dict, RunInfo-style metadata) of a loaded reference checkpoint.

    The tokenizer the checkpoint carries becomes the metadata's tokenizer (its folder and
    fingerprint), and its pad id the model's, so an export holds it with the right ids."""
    ref = read_reference(source, payload=payload)
    args, tok_info = ref.model_args, {}
    tok_dir = reference_tokenizer(ref.tokenizer_files)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        from ettin.tokenizer import tokenizer_fingerprint

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        tok_info = {"path": str(tok_dir), **tokenizer_fingerprint(tokenizer)}
        args = dataclasses.replace(args, pad_token_id=tokenizer.pad_token_id)
    meta = {
        "model_args": dataclasses.asdict(args),
        "objective": ref.objective,
        "tokenizer": tok_info,
        "lineage": {"reference": source, "objectives": [ref.objective]},
        "max_seq_len": None,  # the data config is not in the checkpoint
        "hf_config": {},
    }
    return ref.state, meta
