"""Hugging Face conversion: EttinModel <-> ModernBertForMaskedLM / ModernBertDecoderForCausalLM.

Our state-dict names are HF's encoder names, so the encoder maps one to one. The decoder differs
in two places: the fused `attn.Wqkv` is split into `attn.{q,k,v}_proj` and `head.*` is `lm_head.*`.
Facts behind the choices (transformers 4.57.6) are in docs/architecture.md, "Hugging Face mapping".
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    ModernBertConfig,
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ettin.checkpoint import load_state_dict_strict
from ettin.errors import CheckpointError
from ettin.model import EttinModel, ModelArgs

__all__ = [
    "check_tokenizer",
    "export_hf",
    "export_tokenizer",
    "from_hf_state_dict",
    "hf_config",
    "import_hf",
    "load_hf_state_dict",
    "read_hf_config",
    "to_hf_state_dict",
    "training_tokenizer",
]

# HF config fields that our architecture fixes: no norm/attention/MLP/head biases, a decoder bias,
# exact GELU everywhere, tied embeddings. Importing a model with other values is refused.
FIXED_HF_FIELDS: dict[str, Any] = {
    "norm_bias": False,
    "attention_bias": False,
    "mlp_bias": False,
    "classifier_bias": False,
    "decoder_bias": True,
    "hidden_activation": "gelu",
    "classifier_activation": "gelu",
    "tie_word_embeddings": True,
}
TokenizerLike = PreTrainedTokenizerBase | str | os.PathLike | None
# config.json keys that are bookkeeping, not model settings: never carried from an imported config.
_NOT_CARRIED = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "model_type")


def _roles(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(BOS, EOS) token strings: the tokenizer's own bos/eos, else its CLS/SEP (the Ettin way)."""
    bos = tokenizer.bos_token or tokenizer.cls_token
    eos = tokenizer.eos_token or tokenizer.sep_token
    if bos is None or eos is None:
        raise CheckpointError(
            f"tokenizer {type(tokenizer).__name__} has no {'BOS/CLS' if bos is None else 'EOS/SEP'} "
            "token, so the export cannot say where a sequence starts and ends; set "
            "cls_token/sep_token (or bos_token/eos_token) on it, or use the Ettin tokenizer"
        )
    return bos, eos


def _set_template(tokenizer: PreTrainedTokenizerBase, single: str, pair: str, tokens) -> None:
    from tokenizers.processors import TemplateProcessing

    if not tokenizer.is_fast:
        raise CheckpointError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer, so its special-"
            "token template cannot be set; load it with use_fast=True or use the Ettin tokenizer"
        )
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in dict.fromkeys(tokens)],
    )


def export_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, causal: bool, max_seq_len: int | None = None
) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` set up for a model with this objective, as `export_hf` saves it.

    Both objectives name BOS (`[CLS]`) and EOS (`[SEP]`), so fine-tuning tools (HF Trainer, TRL)
    keep the config's token ids. An encoder gets the training template `[CLS] $A [SEP]`. A
    decoder's template is `[CLS] $A`: a prompt starts with BOS and does not end with EOS (else
    generation, TRL and lm-eval see every text as already finished). `max_seq_len` becomes
    `model_max_length`.
    """
    tok = copy.deepcopy(tokenizer)
    bos, eos = _roles(tok)
    tok.bos_token, tok.eos_token = bos, eos
    if causal:
        _set_template(tok, f"{bos} $A", f"{bos} $A $B:1", [bos])
    else:
        tok = training_tokenizer(tok)
    if max_seq_len is not None:
        tok.model_max_length = int(max_seq_len)
    return tok


def training_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer` with the training template `[CLS] $A [SEP]` (what prep and training expect).

    Undoes a decoder export's `[CLS] $A` template (see `export_tokenizer`); a tokenizer that
    already wraps text as BOS ... EOS is returned unchanged.
    """
    try:
        bos, eos = _roles(tokenizer)
    except CheckpointError:  # not an Ettin-style tokenizer: nothing to restore
        return tokenizer
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(bos), tokenizer.convert_tokens_to_ids(eos)
    ids = tokenizer("a")["input_ids"]
    if len(ids) >= 3 and ids[0] == bos_id and ids[-1] == eos_id or not tokenizer.is_fast:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    _set_template(tok, f"{bos} $A {eos}", f"{bos} $A {eos} $B {eos}", [bos, eos])
    return tok


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, args: ModelArgs) -> None:
    """Refuse a tokenizer whose ids do not fit the model (too many tokens, another pad id)."""
    if len(tokenizer) > args.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {args.vocab_size}: "
            f"ids >= {args.vocab_size} would index past the embedding. Build the model with "
            f"vocab_size >= {len(tokenizer)} or use the tokenizer it was trained with."
        )
    if args.pad_token_id is not None and tokenizer.pad_token_id != args.pad_token_id:
        raise CheckpointError(
            f"tokenizer pad id {tokenizer.pad_token_id} differs from the model's pad_token_id "
            f"{args.pad_token_id}: this is not the tokenizer the model was built for"
        )


def to_hf_state_dict(model: EttinModel) -> dict[str, Tensor]:
    """The model's weights under HF names (encoder: unchanged; decoder: q/k/v split, lm_head)."""
    state = model.state_dict()
    if not model.args.causal:
        return dict(state)
    out = {}
    for name, tensor in state.items():
        if name.endswith("attn.Wqkv.weight"):
            prefix = name.removesuffix("Wqkv.weight")
            q, k, v = tensor.chunk(3, dim=0)  # rows [q | k | v], each (H, H)
            out.update(
                {
                    prefix + "q_proj.weight": q,
                    prefix + "k_proj.weight": k,
                    prefix + "v_proj.weight": v,
                }
            )
        elif name.startswith("head."):
            out["lm_head." + name.removeprefix("head.")] = tensor
        else:
            out[name] = tensor
    return out


def _to_ettin_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Encoder- or decoder-style HF names -> ours (q/k/v concatenated, lm_head -> head)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            parts = [state.get(prefix + p + "_proj.weight") for p in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"{prefix}q_proj.weight has no matching k_proj/v_proj weight")
            out[prefix + "Wqkv.weight"] = torch.cat(parts, dim=0)  # (3H, H)
        elif name.endswith(("attn.k_proj.weight", "attn.v_proj.weight")):
            continue  # consumed with q_proj
        elif name.startswith("lm_head."):
            out["head." + name.removeprefix("lm_head.")] = tensor
        else:
            out[name] = tensor
    return out


def load_hf_state_dict(model: EttinModel, state: dict[str, Tensor]) -> None:
    """Load HF-named weights (encoder or decoder layout) into `model`, or say exactly what differs.

    A missing `decoder.weight` is fine (it is tied to the embedding and HF does not save it).
    """
    load_state_dict_strict(model, _to_ettin_names(state))


def from_hf_state_dict(state: dict[str, Tensor], args: ModelArgs) -> EttinModel:
    """A new EttinModel with `args`, holding HF-named weights (see `load_hf_state_dict`)."""
    model = EttinModel(args)
    load_hf_state_dict(model, state)
    return model


def _load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase | None:
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer))


REFERENCE_WINDOW_KEY = "ettin_causal_window"
"""config.json field of an exported decoder with the reference window (`ModelArgs.causal_window`)."""


def hf_local_attention(args: ModelArgs) -> int:
    """The HF `local_attention` that computes our local window.

    HF 4.57.6's decoder uses `sliding_window = local_attention // 2` keys including the query
    (mask `kv > q - sliding_window`; flash `window_size = (sliding_window - 1, ...)` + causal;
    the cache keeps `sliding_window - 1` past keys): our "hf" rule. The reference rule sees one
    key more, i - local_attention//2 <= j <= i, which is HF's rule for local_attention + 2.
    """
    if args.causal and args.causal_window == "reference":
        return args.local_attention + 2
    return args.local_attention


def hf_config(
    args: ModelArgs,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_seq_len: int | None = None,
    base: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """The HF config for `args`; token ids from the tokenizer, else only the model's pad id.

    `max_seq_len` (the trained sequence length) becomes `max_position_embeddings`. `base` is an
    imported model's config.json (`read_hf_config`): every field ettin does not model (e.g.
    `classifier_pooling`, dropouts) is kept from it when it is of the same model type; ettin's
    own fields and ids always win, except ids the tokenizer cannot give.
    """
    if tokenizer is not None:  # [CLS] doubles as bos and [SEP] as eos, as in the Ettin models
        t = tokenizer
        bos_id = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        eos_id = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        cls_id = t.cls_token_id if t.cls_token_id is not None else bos_id
        sep_id = t.sep_token_id if t.sep_token_id is not None else eos_id
        pad_id = t.pad_token_id
    else:  # unknown ids are left unset rather than guessed
        pad_id, bos_id, cls_id, eos_id, sep_id = args.pad_token_id, None, None, None, None
    ids = dict(
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        cls_token_id=cls_id,
        eos_token_id=eos_id,
        sep_token_id=sep_id,
    )
    model_type = "modernbert-decoder" if args.causal else "modernbert"
    carried: dict[str, Any] = {}
    if base and base.get("model_type") == model_type:
        carried = {k: v for k, v in base.items() if k not in _NOT_CARRIED}
        ids = {k: v for k, v in ids.items() if v is not None or k not in carried}
    if max_seq_len is not None:
        carried["max_position_embeddings"] = int(max_seq_len)
    common = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        norm_eps=args.norm_eps,
        global_rope_theta=args.global_rope_theta,
        local_rope_theta=args.local_rope_theta,
        local_attention=hf_local_attention(args),
        global_attn_every_n_layers=args.global_attn_every_n_layers,
        initializer_range=args.init_std,
        initializer_cutoff_factor=args.init_cutoff_factor,
        **FIXED_HF_FIELDS,
        **ids,
    )
    if args.causal:
        own = dict(
            layer_types=list(args.layer_types), architectures=["ModernBertDecoderForCausalLM"]
        )
        carried.pop("sliding_window", None)  # derived from local_attention
        carried.pop(REFERENCE_WINDOW_KEY, None)
        if args.causal_window == "reference":  # import restores local_attention and the rule
            own[REFERENCE_WINDOW_KEY] = "reference"
        return ModernBertDecoderConfig(**{**carried, **common, **own})
    own = dict(reference_compile=False, architectures=["ModernBertForMaskedLM"])
    return ModernBertConfig(**{**carried, **common, **own})


def export_hf(
    model: EttinModel,
    out_dir: str | os.PathLike,
    tokenizer: TokenizerLike = None,
    *,
    dtype: torch.dtype | None = None,
    allow_rope_mismatch: bool = False,
    max_seq_len: int | None = None,
    base_config: dict[str, Any] | None = None,
    objectives: list[str] | None = None,
) -> Path:
    """Write `model` as an HF model directory (safetensors + config.json [+ tokenizer]).

    Encoder -> ModernBertForMaskedLM, decoder -> ModernBertDecoderForCausalLM. The weights go
    through `load_state_dict(strict=True)` on the HF class, so nothing can be silently dropped.
    `dtype` defaults to the model's parameter dtype. The tokenizer is saved in the form the
    objective needs (`export_tokenizer`). `max_seq_len`, the length the model was trained at,
    becomes `max_position_embeddings` and the tokenizer's `model_max_length` (default: the
    imported config's value, else HF's 8192). `base_config` is the config.json of an imported
    model (`read_hf_config`), whose fields ettin does not model are kept (see `hf_config`).
    `objectives` (the run's lineage: its objective and every ancestor's, oldest first) is written
    as `ettin_objectives`, from which `ettin eval` tells cross-objective models apart.
    """
    args = model.args
    tokenizer = _load_tokenizer(tokenizer)
    if max_seq_len is None and base_config:
        max_seq_len = base_config.get("max_position_embeddings")
    if tokenizer is not None:
        check_tokenizer(tokenizer, args)
        tokenizer = export_tokenizer(tokenizer, causal=args.causal, max_seq_len=max_seq_len)
    if args.causal and args.local_rope_theta != args.global_rope_theta:
        message = (
            f"decoder has local_rope_theta={args.local_rope_theta} but global_rope_theta="
            f"{args.global_rope_theta}; HF ModernBertDecoder (transformers 4.57) applies the global "
            "theta in every layer, so the exported model would compute different outputs"
        )
        if not allow_rope_mismatch:
            raise CheckpointError(message + " (pass allow_rope_mismatch=True to export anyway)")
        warnings.warn(message, stacklevel=2)
    config = hf_config(args, tokenizer, max_seq_len=max_seq_len, base=base_config)
    if objectives:
        config.ettin_objectives = list(objectives)
    hf_cls = ModernBertDecoderForCausalLM if args.causal else ModernBertForMaskedLM
    hf_model: PreTrainedModel = hf_cls(config)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    hf_model.to(dtype or next(model.parameters()).dtype)
    out = Path(out_dir)
    hf_model.save_pretrained(out, safe_serialization=True)
    if args.causal:  # HF omits local_attention, then re-derives sliding_window from 128 on load
        config_path = out / "config.json"
        saved = json.loads(config_path.read_text())
        saved["local_attention"] = hf_local_attention(args)
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _every_n(layer_types: list[str], preferred: int) -> int | None:
    """The n with layer_types == [full iff i % n == 0] (the config's own n first), else None."""
    for n in (preferred, *range(1, len(layer_types) + 1)):
        pattern = [
            "full_attention" if i % n == 0 else "sliding_attention" for i in range(len(layer_types))
        ]
        if layer_types == pattern:
            return n
    return None


def _args_from_hf(config: PretrainedConfig, raw: dict[str, Any], source: str) -> ModelArgs:
    """ModelArgs for an HF config; `raw` is config.json as written (HF re-derives sliding_window)."""
    if config.model_type not in ("modernbert", "modernbert-decoder"):
        raise CheckpointError(
            f"{source}: model_type {config.model_type!r} is not modernbert or modernbert-decoder"
        )
    for field, value in FIXED_HF_FIELDS.items():
        if getattr(config, field) != value:
            raise CheckpointError(
                f"{source}: {field}={getattr(config, field)!r} is not supported (Ettin models use {value!r})"
            )
    causal = config.model_type == "modernbert-decoder"
    window = "hf"
    every_n = config.global_attn_every_n_layers
    local_theta = (
        config.local_rope_theta if config.local_rope_theta is not None else config.global_rope_theta
    )
    if causal:
        every_n = _every_n(list(config.layer_types), every_n)
        if every_n is None:
            raise CheckpointError(
                f"{source}: layer_types {config.layer_types} is not 'global iff layer % n == 0' for any n"
            )
        local_attention = raw.get("local_attention") or 2 * raw.get("sliding_window", 64)
        if raw.get(REFERENCE_WINDOW_KEY) == "reference":  # our export of the reference window
            local_attention -= 2
            window = "reference"
        if local_theta != config.global_rope_theta:
            warnings.warn(
                f"{source}: local_rope_theta={local_theta} is ignored by HF ModernBertDecoder, which applies "
                f"global_rope_theta={config.global_rope_theta} in every layer; importing with the HF behaviour",
                stacklevel=3,
            )
        local_theta = config.global_rope_theta
    else:
        local_attention = config.local_attention
    return ModelArgs(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        causal=causal,
        global_attn_every_n_layers=every_n,
        local_attention=local_attention,
        causal_window=window,
        global_rope_theta=config.global_rope_theta,
        local_rope_theta=local_theta,
        norm_eps=config.norm_eps,
        init_std=config.initializer_range,
        init_cutoff_factor=config.initializer_cutoff_factor,
        pad_token_id=config.pad_token_id,
    )


def read_hf_config(
    name_or_dir: str | os.PathLike,
    *,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """An HF model's config.json as written (what `export_hf(base_config=...)` carries over)."""
    hub = _hub_options(local_files_only, revision)
    raw, _ = PretrainedConfig.get_config_dict(str(name_or_dir), **hub)
    return dict(raw)


def _hub_options(local_files_only: bool | None, revision: str | None) -> dict[str, Any]:
    """The from_pretrained keywords for a Hub source (none for the defaults)."""
    hub: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
    if revision is not None:
        hub["revision"] = revision  # a branch or tag, e.g. step599525, ext1000, decay100
    return hub


def import_hf(
    name_or_dir: str | os.PathLike,
    *,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> tuple[EttinModel, PreTrainedTokenizerBase | None]:
    """Load an HF ModernBERT encoder or decoder (directory or Hub name) as an EttinModel.

    Returns the model and the tokenizer stored beside it (None when there is none), with the
    training template `[CLS] $A [SEP]` restored (`training_tokenizer`). The config fields ettin
    does not model are not part of the model: keep them with `read_hf_config` (`ettin import`
    stores them in the checkpoint and `ettin export` writes them back). `revision` picks a
    branch or tag of a Hub repo (the Ettin repos hold intermediate checkpoints as revisions).
    """
    source = str(name_or_dir)
    hub = _hub_options(local_files_only, revision)
    config = AutoConfig.from_pretrained(source, **hub)
    raw = read_hf_config(source, local_files_only=local_files_only, revision=revision)
    args = _args_from_hf(config, raw, source)
    auto = AutoModelForCausalLM if args.causal else AutoModelForMaskedLM
    hf_model = auto.from_pretrained(source, config=config, dtype=torch.float32, **hub)
    model = from_hf_state_dict(hf_model.state_dict(), args)
    tokenizer = _tokenizer_beside(source, hub)
    return model, (training_tokenizer(tokenizer) if tokenizer is not None else None)


def _tokenizer_beside(source: str, hub: dict) -> PreTrainedTokenizerBase | None:
    if Path(source).is_dir() and not any(
        (Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, **hub)
    except (OSError, ValueError):
        return None
