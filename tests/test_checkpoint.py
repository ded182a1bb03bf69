"""Checkpoints: the ettin file round trip, lineage digests, and errors that name the problem."""

import pytest
import torch

from ettin.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_ettin_checkpoint,
    state_digest,
)
from ettin.model import EttinModel, model_args


def _model(**overrides) -> EttinModel:
    torch.manual_seed(0)
    return EttinModel(model_args("test", vocab_size=128, pad_token_id=3, **overrides))


def test_round_trip_restores_every_tensor(tmp_path):
    model = _model(causal=True)
    info = CheckpointInfo(model_args=model.args, objective="clm", lineage={"init_from": "x"})
    path = save_ettin_checkpoint(tmp_path / "m.pt", model, info)
    again, got = load_checkpoint(path)
    assert (
        got.objective == "clm"
        and got.model_args == model.args
        and got.lineage == {"init_from": "x"}
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert state_digest(model.state_dict()) == state_digest(again.state_dict())


def test_digest_changes_with_any_weight():
    model = _model()
    before = state_digest(model.state_dict())
    with torch.no_grad():
        model.head.norm.weight[0] += 1e-3
    assert state_digest(model.state_dict()) != before


def test_checkpoint_from_another_size_names_the_tensor(tmp_path):
    small = _model()
    path = save_ettin_checkpoint(
        tmp_path / "s.pt", small, CheckpointInfo(model_args=small.args, objective="mlm")
    )
    state, _ = read_checkpoint(path)
    bigger = _model(intermediate_size=128)
    with pytest.raises(
        CheckpointError, match=r"mlp\.Wi\.weight.*expected shape \(256, 64\), found \(192, 64\)"
    ):
        load_weights(bigger, state, source=str(path))


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_unreadable_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(bad)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint \(\*\.pt\)"):
        read_checkpoint(tmp_path)
