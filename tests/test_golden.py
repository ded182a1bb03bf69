"""A stored loss curve: 20 steps of the tiny encoder and decoder, compared within 1e-5.

Any change to the model's numerics, its init, the MLM masking or the optimiser moves these
losses; a change that should move them regenerates the file on purpose:

    .venv/bin/python tests/test_golden.py --update     # rewrites tests/golden/tiny_losses.json

The loop is plain torch (no Composer, no data files), so it runs in seconds and isolates the
numerics: a fixed synthetic (learnable) token stream, batches padded to the longest sequence, the real
`mlm_mask_batch`, the real `build_optimizer` (StableAdamW) and dropout 0.1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
STEPS, BATCH, VOCAB = 20, 4, 512
PAD, CLS, SEP, MASK = 0, 1, 2, 3  # a synthetic vocabulary: ids 4.. are ordinary tokens


def _batches(objective: str) -> list[dict[str, torch.Tensor]]:
    from ettin.objectives import mlm_mask_batch

    rng = np.random.default_rng(0)
    out = []
    for step in range(STEPS):
        seqs = []
        for _ in range(BATCH):  # learnable: each token is the previous one plus a fixed stride
            n, start, stride = rng.integers(12, 48), rng.integers(VOCAB), rng.integers(1, 4)
            body = 4 + (start + stride * np.arange(n)) % (VOCAB - 4)
            seqs.append(np.concatenate([[CLS], body, [SEP]]))
        labels = None
        if objective == "mlm":
            pairs = mlm_mask_batch(
                seqs,
                sample_ids=list(range(step * BATCH, (step + 1) * BATCH)),
                epochs=[0] * BATCH,
                seed=21,
                p=0.3,
                mask_id=MASK,
                special_ids=np.array([PAD, CLS, SEP, MASK]),
                ordinary_ids=np.arange(4, VOCAB),
            )
            seqs, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.full((BATCH, width), PAD)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        lab = torch.full((BATCH, width), -100)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.from_numpy(np.asarray(s))
            mask[r, : len(s)] = 1
            if labels is not None:
                lab[r, : len(s)] = torch.from_numpy(np.asarray(labels[r]))
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = lab
        out.append(batch)
    return out


def losses(objective: str) -> list[float]:
    """The training losses of 20 steps of the `test` preset with the objective's mask."""
    from ettin.config import OptimConfig
    from ettin.model import EttinModel, model_args
    from ettin.optim import build_optimizer

    torch.manual_seed(0)
    args = model_args(
        "test",
        vocab_size=VOCAB,
        causal=objective == "clm",
        pad_token_id=PAD,
        attn_out_dropout=0.1,
        local_attention=16,
    )
    model = EttinModel(args).train()
    model.attn_impl = "torch"
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=3e-4))
    curve = []
    for batch in _batches(objective):
        loss = model(batch["input_ids"], batch["attention_mask"], batch.get("labels")).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_loss_curve_matches_the_golden_file(objective):
    golden = json.loads(GOLDEN.read_text())[objective]
    got = losses(objective)
    np.testing.assert_allclose(got, golden, rtol=0, atol=1e-5, err_msg=__doc__)


def test_the_tolerance_catches_an_init_change(monkeypatch):
    """The golden comparison is tight enough to see a small numerics change (init std x1.05)."""
    from ettin.model import sizes

    golden = json.loads(GOLDEN.read_text())["clm"]
    original = sizes.model_args

    def wider_init(*a, **kw):
        args = original(*a, **kw)
        return type(args)(**{**args.__dict__, "init_std": args.init_std * 1.05})

    monkeypatch.setattr(sizes, "model_args", wider_init)
    monkeypatch.setattr("ettin.model.model_args", wider_init)
    assert np.abs(np.asarray(losses("clm")) - golden).max() > 1e-3


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_golden.py --update")
    GOLDEN.parent.mkdir(exist_ok=True)
    curves = {objective: losses(objective) for objective in ("mlm", "clm")}
    GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
    print(
        f"wrote {GOLDEN}: " + ", ".join(f"{k} {v[0]:.4f} -> {v[-1]:.4f}" for k, v in curves.items())
    )
