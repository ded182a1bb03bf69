"""The downstream recipes (recipes/downstream/) against the real clients, on tiny exports.

Each recipe runs for a step or two on a tiny encoder/decoder exported with the real Ettin
tokenizer: sentence-transformers (dense, CrossEncoder, SparseEncoder), PyLate, TRL, the HF
Trainer and lm-evaluation-harness. Needs the `downstream` extra. One fast case runs by default.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ettin.interop import export_hf, load_hf_state_dict
from ettin.model import EttinModel, model_args

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "downstream"
LIMIT = 8  # held-out examples each recipe scores


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"downstream_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from ettin.tokenizer import load_tokenizer

    return load_tokenizer("ettin")


def tiny(tokenizer, causal: bool) -> EttinModel:
    torch.manual_seed(0)
    theta = dict(global_rope_theta=160000.0, local_rope_theta=160000.0)
    args = model_args(
        "test",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        causal=causal,
        **theta,
    )
    return EttinModel(args)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """'encoder' / 'decoder' -> a tiny export (random weights, the real tokenizer)."""
    root = tmp_path_factory.mktemp("downstream")
    return {
        name: export_hf(tiny(tokenizer, causal), root / name, tokenizer=tokenizer)
        for name, causal in (("encoder", False), ("decoder", True))
    }


def ids_of(tokenizer) -> tuple[int, int]:
    """(BOS, EOS) as the Ettin models use them: [CLS] and [SEP], ids from the tokenizer."""
    return tokenizer.convert_tokens_to_ids("[CLS]"), tokenizer.convert_tokens_to_ids("[SEP]")


# ---------------------------------------------------------------- default suite


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_hf_trainer_classification_keeps_bos_eos(exports, tokenizer, kind, tmp_path):
    """HF Trainer one step, then save: config.json keeps bos/eos (the Trainer aligns them)."""
    result = recipe("classify").run(
        str(exports[kind]), steps=1, batch_size=4, limit=LIMIT, out=tmp_path
    )
    assert 0.0 <= result["after"] <= 1.0
    saved = json.loads((tmp_path / "config.json").read_text())
    bos, eos = ids_of(tokenizer)
    assert (saved["bos_token_id"], saved["eos_token_id"]) == (bos, eos)


# ---------------------------------------------------------------- slow: one per client


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "rerank", "splade", "colbert"])
def test_encoder_recipes_run(exports, name):
    result = recipe(name).run(str(exports["encoder"]), steps=1, batch_size=4, limit=LIMIT)
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0


@pytest.mark.slow
def test_rerank_runs_on_a_decoder(exports):
    result = recipe("rerank").run(str(exports["decoder"]), steps=1, batch_size=4, limit=LIMIT)
    assert 0.0 <= result["after"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_trl_sft_first_batch_starts_with_bos_and_ends_with_one_eos(exports, tokenizer, chat):
    """Plain text: TRL appends EOS once ([SEP] [SEP] before); chat: the shipped template."""
    result = recipe("sft").run(str(exports["decoder"]), steps=1, batch_size=2, limit=2, chat=chat)
    row = result["first_row"]
    bos, eos = ids_of(tokenizer)
    assert row[0] == bos and row[1] != bos
    assert row[-1] == eos and row[-2] != eos  # exactly one EOS: the one that ends the text
    assert math.isfinite(result["before"]) and math.isfinite(result["after"])


def united_states_decoder(tokenizer, out: Path) -> Path:
    """A tiny decoder trained (briefly, through HF) on text where ' States' follows 'the United'."""
    from transformers import AutoModelForCausalLM

    model = tiny(tokenizer, causal=True)
    first = export_hf(model, out / "untrained", tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(first).train()
    texts = [
        "We love the United States.",
        "the United States of America",
        "Congress of the United States",
        "I ate a banana and an apple.",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    for _ in range(40):
        loss = hf(**batch, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    load_hf_state_dict(model, hf.state_dict())
    return export_hf(model, out / "trained", tokenizer=tokenizer)


@pytest.mark.slow
def test_lm_eval_scores_the_continuation_not_eos(tokenizer, tmp_path):
    """HFLM loglikelihood / generate_until / simple_evaluate on a local task file."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = united_states_decoder(tokenizer, tmp_path)
    lm = HFLM(pretrained=str(path), batch_size=2, device="cpu")
    requests = [
        Instance("loglikelihood", {}, ("the United", cont), i)
        for i, cont in enumerate([" States", " banana"])
    ]
    (states, _), (banana, _) = lm.loglikelihood(requests)
    assert states > banana
    # the continuation is scored as its own tokens, not as one [SEP]
    whole = lm.tok_encode("the United States")
    assert whole[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in whole
    gen = lm.generate_until(
        [Instance("generate_until", {}, ("the United", {"until": ["."], "max_gen_toks": 4}), 0)]
    )
    assert isinstance(gen[0], str)
    result = recipe("lm_eval_task").run(str(path), limit=LIMIT, out=tmp_path / "task")
    assert 0.0 <= result["after"] <= 1.0
