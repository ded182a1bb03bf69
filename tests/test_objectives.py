"""MLM masking and loss-token counts (ettin.objectives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_tokenizer

from ettin.objectives import IGNORE_INDEX, mlm_mask, num_loss_tokens, token_sets


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sets(tok):
    return token_sets(tok)


def _mask(ids, tok, sets, *, sample_id=0, epoch=0, seed=21, p=0.3):
    special, ordinary = sets
    return mlm_mask(
        ids,
        sample_id=sample_id,
        epoch=epoch,
        seed=seed,
        p=p,
        mask_id=tok.mask_token_id,
        special_ids=special,
        ordinary_ids=ordinary,
    )


def test_token_sets_excludes_specials_added_and_unused(tok, sets):
    special, ordinary = sets
    roles = {
        tok.cls_token_id,
        tok.sep_token_id,
        tok.pad_token_id,
        tok.mask_token_id,
        tok.unk_token_id,
    }
    assert roles <= set(special.tolist())
    unused = {tok.convert_tokens_to_ids(f"[unused{i}]") for i in range(3)}
    assert not (set(ordinary.tolist()) & (roles | unused))
    assert set(ordinary.tolist()) == set(range(60))  # exactly the words w0..w59


def _doc(tok, n, seed):
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 60, n)
    return np.concatenate(
        [[tok.cls_token_id], body, [tok.sep_token_id], [tok.mask_token_id, tok.unk_token_id]]
    )


def test_specials_never_selected_and_replacements_are_ordinary(tok, sets):
    special, ordinary = sets
    for sid in range(200):
        ids = _doc(tok, 50, sid)
        inputs, labels = _mask(ids, tok, sets, sample_id=sid, p=0.5)
        is_special = np.isin(ids, special)
        assert (labels[is_special] == IGNORE_INDEX).all()
        assert (inputs[is_special] == ids[is_special]).all()
        sel = labels != IGNORE_INDEX
        assert (labels[sel] == ids[sel]).all()
        changed = sel & (inputs != ids) & (inputs != tok.mask_token_id)
        assert np.isin(inputs[changed], ordinary).all()
        assert (inputs[~sel] == ids[~sel]).all()


def test_rates_80_10_10(tok, sets):
    ids = np.random.default_rng(0).integers(0, 60, 200_000)
    inputs, labels = _mask(ids, tok, sets, p=0.3)
    sel = labels != IGNORE_INDEX
    assert abs(sel.mean() - 0.3) < 0.005
    masked = (inputs[sel] == tok.mask_token_id).mean()
    kept = (inputs[sel] == ids[sel]).mean()
    random = 1 - masked - kept
    # A random replacement can draw the original token (1/60 of the 10%): counted as kept.
    assert abs(masked - 0.8) < 0.02
    assert abs(random - 0.1 * 59 / 60) < 0.02
    assert abs(kept - (0.1 + 0.1 / 60)) < 0.02


def test_mask_is_a_function_of_seed_sample_epoch_only(tok, sets):
    ids = _doc(tok, 300, 1)
    a = _mask(ids, tok, sets, sample_id=7, epoch=2)
    b = _mask(ids.copy(), tok, sets, sample_id=7, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_epoch = _mask(ids, tok, sets, sample_id=7, epoch=3)
    other_sample = _mask(ids, tok, sets, sample_id=8, epoch=2)
    other_seed = _mask(ids, tok, sets, sample_id=7, epoch=2, seed=22)
    for c in (other_epoch, other_sample, other_seed):
        assert not np.array_equal(a[1], c[1])


def test_mask_independent_of_batch_composition(tok, sets):
    """Collating a sample with different neighbours (and padding widths) gives it the same mask."""
    from ettin.data.collate import Collator, MaskSpec

    special, ordinary = sets
    spec = MaskSpec(
        p=0.3, seed=21, mask_id=tok.mask_token_id, special_ids=special, ordinary_ids=ordinary
    )
    col = Collator(pad_id=tok.pad_token_id, max_seq_len=256, mlm=spec)
    target = (5, 1, _doc(tok, 40, 5))
    alone = col([target])
    crowd = col([(9, 1, _doc(tok, 100, 9)), target, (3, 1, _doc(tok, 7, 3))])
    n = len(target[2])
    assert torch.equal(alone["input_ids"][0, :n], crowd["input_ids"][1, :n])
    assert torch.equal(alone["labels"][0, :n], crowd["labels"][1, :n])


def test_num_loss_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert num_loss_tokens({"attention_mask": mask}, "clm") == (3 - 1) + (2 - 1)
    packed = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert num_loss_tokens({"attention_mask": packed}, "clm") == (2 - 1) + (3 - 1) + (6 - 1)
    labels = torch.tensor([[-100, 5, -100, 7], [3, -100, -100, -100]])
    assert num_loss_tokens({"attention_mask": mask, "labels": labels}, "mlm") == 3
    with pytest.raises(ValueError):
        num_loss_tokens({"attention_mask": mask}, "nsp")


def test_batch_masking_equals_per_sequence_and_is_positional(tok, sets):
    """The batched path is the per-sequence function: a batch's masks are each sample's own,
    and a token's fate depends on (seed, epoch, sample_id, position) only, not on the length."""
    from ettin.objectives import mlm_mask_batch

    special, ordinary = sets
    docs = [_doc(tok, n, seed) for n, seed in ((50, 1), (7, 2), (120, 3))]
    batch = mlm_mask_batch(
        docs,
        sample_ids=[5, 9, 11],
        epochs=[0, 1, 0],
        seed=21,
        p=0.3,
        mask_id=tok.mask_token_id,
        special_ids=special,
        ordinary_ids=ordinary,
    )
    for doc, sid, epoch, (inputs, labels) in zip(docs, [5, 9, 11], [0, 1, 0], batch):
        one = _mask(doc, tok, sets, sample_id=sid, epoch=epoch)
        np.testing.assert_array_equal(inputs, one[0])
        np.testing.assert_array_equal(labels, one[1])
    long_doc = docs[2]
    full = _mask(long_doc, tok, sets, sample_id=3)
    prefix = _mask(long_doc[:60], tok, sets, sample_id=3)
    np.testing.assert_array_equal(prefix[1], full[1][:60])
    assert not np.array_equal(full[1], _mask(long_doc, tok, sets, sample_id=4)[1])
