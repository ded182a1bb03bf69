"""Loading exported models and the one scoring interface every evaluator uses.

An evaluated model is an exported Hugging Face directory (config.json + model.safetensors +
tokenizer files): `model_type` "modernbert" is an encoder (ModernBertForMaskedLM), and
"modernbert-decoder" a decoder (ModernBertDecoderForCausalLM). Evaluators never call the HF
`forward`; they use two steps so that the vocabulary projection (the costly part of a small
model) runs only where a score is needed:

- `hidden(input_ids, attention_mask) -> (B, S, H)`: the backbone's last hidden states;
- `project(h) -> (..., V)`: the language-model head on chosen positions only.

Anything with these two methods and the few token attributes of `ScoringModel` can be scored,
which is how the tests plug in stub models with known answers.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kind = Literal["encoder", "decoder"]
MODEL_TYPES: dict[str, Kind] = {"modernbert": "encoder", "modernbert-decoder": "decoder"}

# Positions projected onto the vocabulary at once: 512 x 50368 floats is about 100 MB.
PROJECT_CHUNK = 512


class ScoringModel(Protocol):
    """What the scorers need from a model (an `EvalModel`, or a stub in the tests)."""

    name: str
    kind: Kind
    pad_id: int
    mask_id: int | None
    start_ids: list[int]  # put before every text: [CLS] (the Ettin BOS for both kinds)
    end_ids: list[int]  # closes a whole text: [SEP]
    max_length: int

    def tokenize(self, text: str) -> list[int]: ...

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def project(self, hidden: Tensor) -> Tensor: ...


def model_kind(source: str | Path) -> Kind:
    """ "encoder" or "decoder", from the `model_type` in `source`'s config.json."""
    path = Path(source)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path}: no config.json; expected an exported HF model directory"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
    else:  # a Hub name: only reachable with network access
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(source)).model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is neither 'modernbert' (encoder) nor "
            "'modernbert-decoder' (decoder)"
        )
    return MODEL_TYPES[model_type]


class EvalModel:
    """An exported encoder or decoder with its tokenizer, behind the `ScoringModel` interface."""

    def __init__(self, module: nn.Module, tokenizer, kind: Kind, name: str) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.kind: Kind = kind
        self.name = name
        self.device = next(module.parameters()).device
        start = (
            tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        )
        end = (
            tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        )
        self.start_ids = [start] if start is not None else []
        self.end_ids = [end] if end is not None else []
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{name}: the tokenizer has no pad token")
        self.pad_id: int = tokenizer.pad_token_id
        self.mask_id: int | None = tokenizer.mask_token_id
        if kind == "encoder" and self.mask_id is None:
            raise ValueError(f"{name}: an encoder needs a tokenizer with a mask token")
        self.max_length = int(min(getattr(module.config, "max_position_embeddings", 8192), 8192))
        # The objectives of the run that made this model and of every run it started from,
        # oldest first, as `ettin export` records them ("cross" when both appear).
        own = "mlm" if kind == "encoder" else "clm"
        self.lineage: list[str] = list(getattr(module.config, "ettin_objectives", None) or [own])

    @classmethod
    def load(
        cls, source: str | Path, name: str | None = None, device: str | None = None
    ) -> EvalModel:
        """Load an exported HF directory (or, with network access, a Hub name such as
        `jhu-clsp/ettin-encoder-17m`) as an encoder or decoder, in float32, sdpa attention."""
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        kind = model_kind(source)
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in tokenizer_files):
            raise FileNotFoundError(
                f"{source}: no tokenizer files beside the model; export with a tokenizer "
                "(`ettin export CHECKPOINT OUT --tokenizer DIR`) or save one into the folder"
            )
        auto = AutoModelForMaskedLM if kind == "encoder" else AutoModelForCausalLM
        kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
        if kind == "encoder":
            kwargs["reference_compile"] = False
        module = auto.from_pretrained(str(source), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        module.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        return cls(module, tokenizer, kind, name or Path(str(source)).name)

    @property
    def hidden_size(self) -> int:
        return int(self.module.config.hidden_size)

    def num_parameters(self) -> int:
        """Parameters with tied embeddings counted once (the size the Ettin names use)."""
        return sum(p.numel() for p in self.module.parameters())

    def tokenize(self, text: str) -> list[int]:
        # verbose=False: a whole speech may exceed model_max_length; callers cut it themselves.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def backbone(self) -> nn.Module:
        return self.module.model

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {"use_cache": False} if self.kind == "decoder" else {}
        out = self.backbone()(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            **kwargs,
        )
        return out.last_hidden_state

    def project(self, hidden: Tensor) -> Tensor:
        head = self.module.head if self.kind == "encoder" else self.module.lm_head
        return self.module.decoder(head(hidden))

    def parameters(self, embeddings: bool = True) -> Iterator[nn.Parameter]:
        """The backbone's parameters: what fine-tuning a classifier or an embedder updates
        (without the token embedding matrix when `embeddings` is False)."""
        skip = set() if embeddings else {id(self.backbone().get_input_embeddings().weight)}
        return (p for p in self.backbone().parameters() if id(p) not in skip)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Fine-tune inside this block; the weights are put back on exit."""
        saved = copy.deepcopy(self.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(saved)
            self.module.eval()


# --------------------------------------------------------------------------- batching


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token rows into (input_ids, attention_mask), both (B, S) long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped longest first so that rows x longest <= max_tokens (at least 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# --------------------------------------------------------------------------- token scores


@dataclass
class TokenScores:
    """Per scored token: log-probability of the target and whether it is the argmax."""

    logprobs: Tensor  # (k,) float
    correct: Tensor  # (k,) bool

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def greedy(self) -> bool:
        return bool(self.correct.all())


def _score(
    model: ScoringModel,
    inputs: Sequence[Sequence[int]],
    read_at: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    max_tokens: int,
) -> list[TokenScores]:
    """log p(targets[i][j]) read from the logits at position read_at[i][j] of row inputs[i]."""
    out: list[TokenScores | None] = [None] * len(inputs)
    with torch.inference_mode():
        for batch in length_batches([len(r) for r in inputs], max_tokens):
            ids, mask = pad_rows([inputs[i] for i in batch], model.pad_id)
            hidden = model.hidden(ids, mask)
            rows = torch.cat([torch.full((len(read_at[i]),), b) for b, i in enumerate(batch)])
            cols = torch.cat([torch.tensor(list(read_at[i]), dtype=torch.long) for i in batch])
            tgt = torch.cat([torch.tensor(list(targets[i]), dtype=torch.long) for i in batch])
            picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # (n, H)
            logp, correct = [], []
            for start in range(0, len(picked), PROJECT_CHUNK):
                logits = model.project(picked[start : start + PROJECT_CHUNK]).float()
                t = tgt[start : start + PROJECT_CHUNK].to(logits.device)
                logp.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0].cpu())
                correct.append((logits.argmax(-1) == t).cpu())
            logp_all = torch.cat(logp) if logp else torch.zeros(0)
            correct_all = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
            offset = 0
            for i in batch:
                k = len(read_at[i])
                out[i] = TokenScores(
                    logp_all[offset : offset + k], correct_all[offset : offset + k]
                )
                offset += k
    return out  # type: ignore[return-value]


def next_token_scores(
    model: ScoringModel,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens: int = 16384,
) -> list[TokenScores]:
    """Causal scoring. For each (ids, positions): log p(ids[p] | ids[:p]) for every p >= 1 in
    positions, read from the logits at p - 1. One forward per row."""
    for ids, positions in rows:
        if any(p < 1 or p >= len(ids) for p in positions):
            raise ValueError(
                f"next-token positions must lie in [1, {len(ids)}): got {list(positions)}"
            )
    return _score(
        model,
        [ids for ids, _ in rows],
        [[p - 1 for p in positions] for _, positions in rows],
        [[ids[p] for p in positions] for ids, positions in rows],
        max_tokens,
    )


def masked_scores(
    model: ScoringModel,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens: int = 16384,
) -> list[TokenScores]:
    """Masked scoring. For each (ids, positions): every p in positions is replaced by [MASK]
    at once and log p(ids[p]) is read from the logits at p. One forward per row."""
    if model.mask_id is None:
        raise ValueError(f"{model.name}: masked scoring needs a mask token")
    inputs = []
    for ids, positions in rows:
        masked = list(ids)
        for p in positions:
            masked[p] = model.mask_id
        inputs.append(masked)
    return _score(
        model,
        inputs,
        [list(positions) for _, positions in rows],
        [[ids[p] for p in positions] for ids, positions in rows],
        max_tokens,
    )
