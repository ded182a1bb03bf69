"""FLOPs count, peak FLOP/s table, and the callbacks (unit level, then inside a tiny Composer run)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import pytest
import torch
from composer.core import Timestamp
from helpers import TrainingDevice
from torch import nn

from ettin.callbacks import GradNorm, HFExport, PackingEfficiency, Throughput
from ettin.callbacks import speed as speed_module
from ettin.callbacks.grad_norm import group_grad_norms
from ettin.callbacks.speed import sequence_lengths
from ettin.data.collate import packing_efficiency
from ettin.flops import flops_per_token, mean_keys, peak_flops, peak_flops_from_name


@dataclass(frozen=True)
class Args:
    """The ModelArgs fields flops_per_token reads."""

    num_layers: int = 2
    hidden_size: int = 8
    intermediate_size: int = 12
    num_heads: int = 2
    vocab_size: int = 20
    causal: bool = False
    global_attn_every_n_layers: int = 3
    local_attention: int = 4


class Recorder:
    """A stand-in Logger that keeps what was logged."""

    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.append(dict(metrics))


# ---------------------------------------------------------------- FLOPs


def brute_mean_keys(seq_len: int, before: int, after: int) -> float:
    pairs = sum(1 for i in range(seq_len) for j in range(seq_len) if i - before <= j <= i + after)
    return pairs / seq_len


@pytest.mark.parametrize("seq_len", [1, 2, 5, 10, 64, 130, 300])
@pytest.mark.parametrize(
    ("before", "after"), [(2, 2), (1, 0), (63, 0), (64, 64), (1000, 1000), (1000, 0)]
)
def test_mean_keys_counts_pairs(seq_len: int, before: int, after: int) -> None:
    assert mean_keys(seq_len, before, after) == pytest.approx(
        brute_mean_keys(seq_len, before, after)
    )


def test_flops_tiny_config_by_hand() -> None:
    # 2 layers: layer 0 global, layer 1 local (window 4: encoder +-2, decoder self + 1 earlier).
    # H=8, I=12, V=20, S=10. Per layer: 2*(Wqkv 8*24 + Wo 8*8 + Wi 8*24 + Wo_mlp 12*8) = 1088.
    weights = 2 * 1088
    head = 2 * (8 * 8 + 8 * 20)  # 448
    # Encoder keys: global 10; local, positions 0..9 see 3,4,5,5,5,5,5,5,4,3 keys -> 4.4.
    enc_attention = 4 * 8 * (10 + 4.4)
    assert flops_per_token(Args(), 10, causal=False, training=False) == pytest.approx(
        weights + head + enc_attention
    )
    assert flops_per_token(Args(), 10, causal=False) == pytest.approx(
        3 * (weights + head + enc_attention)
    )
    # MLM: only 30% of positions reach head.dense and the vocabulary projection.
    assert flops_per_token(
        Args(), 10, causal=False, training=False, mlm_probability=0.3
    ) == pytest.approx(weights + 0.3 * head + enc_attention)
    # Decoder keys: global causal (10+1)/2 = 5.5; local 1,2,2,...,2 -> 1.9.
    dec_attention = 4 * 8 * (5.5 + 1.9)
    assert flops_per_token(Args(causal=True), 10, training=False) == pytest.approx(
        weights + head + dec_attention
    )
    assert flops_per_token(Args(), 10, causal=True, training=False) == pytest.approx(
        weights + head + dec_attention
    )


@pytest.mark.parametrize("causal", [False, True])
def test_local_layers_scale_with_window_not_context(causal: bool) -> None:
    def attention(layers: int, seq_len: int) -> float:  # forward attention FLOPs per token
        args = Args(
            num_layers=layers,
            hidden_size=64,
            intermediate_size=96,
            local_attention=128,
            causal=causal,
        )
        no_attention = (
            flops_per_token(args, 1, training=False) - 4 * 64 * layers
        )  # S=1: one key per layer
        return flops_per_token(args, seq_len, training=False) - no_attention

    # Layers 1 and 2 are local: their share is flat in the context length, the global layer's is linear.
    local_4k, local_8k = (
        attention(3, 4096) - attention(1, 4096),
        attention(3, 8192) - attention(1, 8192),
    )
    assert local_8k == pytest.approx(local_4k, rel=0.01)
    keys = 129 if not causal else 64
    assert local_8k == pytest.approx(2 * 4 * 64 * keys, rel=0.01)
    global_ratio = attention(1, 8192) / attention(1, 4096)
    assert global_ratio == pytest.approx(2.0, rel=0.01)


def test_peak_flops() -> None:
    assert peak_flops("cpu") is None
    assert peak_flops_from_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_from_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_from_name("NVIDIA H200") == 989e12
    assert peak_flops_from_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_from_name("Tesla T4") is None


# ---------------------------------------------------------------- batch statistics

MASK = torch.tensor(
    [[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
)  # packed row (2 + 3) and a padded row (4)


def test_sequence_lengths_and_packing_efficiency() -> None:
    assert sequence_lengths(MASK).tolist() == [[2, 3, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
    assert packing_efficiency({"attention_mask": MASK}) == pytest.approx(9 / 12)

    callback, logger = PackingEfficiency(interval=2), Recorder()
    for batch in range(4):
        state = SimpleNamespace(timestamp=Timestamp(batch=batch), batch={"attention_mask": MASK})
        callback.after_dataloader(state, logger)  # type: ignore[arg-type]
    assert logger.metrics == [{"trainer/packing_efficiency": pytest.approx(0.75)}] * 2


def test_throughput_collectives_run_on_the_training_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NCCL refuses host tensors: every all_reduce must get a tensor moved to `state.device`.

    At BATCH_END Composer has restored the host copy of the batch, so statistics computed from it
    live on the CPU; on a GPU run an all_reduce of them stopped training at the first window.
    """
    device = TrainingDevice()
    reduced: list[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor, reduce_operation: str = "SUM") -> None:
        assert any(tensor is t for t in device.moved), "all_reduce of a tensor not on the device"
        reduced.append(tensor)

    monkeypatch.setattr(speed_module.dist, "all_reduce", all_reduce)
    callback = Throughput(window=2, flops_per_token_fn=lambda n: 1.0, peak_flops_per_device=1.0)
    logger = Recorder()
    state = SimpleNamespace(batch={"attention_mask": MASK}, device=device)
    for _ in range(3):
        callback.batch_end(state, logger)  # type: ignore[arg-type]
    assert len(reduced) == 1 and len(logger.metrics) == 1


def test_throughput_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 1.5, 2.5, 4.0])
    monkeypatch.setattr(speed_module, "perf_counter", lambda: next(clock))
    callback = Throughput(
        window=2, flops_per_token_fn=lambda length: 100.0 * length, peak_flops_per_device=1e3
    )
    logger = Recorder()
    state = SimpleNamespace(batch={"attention_mask": MASK}, device=TrainingDevice())
    callback.batch_end(state, logger)  # t=0: the first batch only starts the clock
    callback.batch_end(state, logger)  # t=1
    callback.eval_start(state, logger)  # t=1.5 .. 2.5: one second of evaluation, not counted
    callback.eval_end(state, logger)
    callback.batch_end(state, logger)  # t=4: window of 2 batches over 3 s of training
    (metrics,) = logger.metrics
    flops = 2 * 100.0 * (2**2 + 3**2 + 4**2)  # each sequence costs length * flops_per_token(length)
    assert metrics["throughput/tokens_per_sec"] == pytest.approx(2 * 9 / 3)
    assert metrics["throughput/samples_per_sec"] == pytest.approx(2 * 3 / 3)
    assert metrics["throughput/device/tokens_per_sec"] == pytest.approx(2 * 9 / 3)
    assert metrics["throughput/device/tflops_per_sec"] == pytest.approx(flops / 3 / 1e12)
    assert metrics["throughput/device/mfu"] == pytest.approx(flops / 3 / 1e3)


# ---------------------------------------------------------------- gradient norm


def test_grad_norm_covers_all_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    decay = [p for p in model.parameters() if p.ndim == 2]
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    model[1].bias.grad = None  # a parameter without a gradient counts as zero
    opt = torch.optim.SGD([{"params": no_decay}, {"params": decay}], lr=0.1)

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    total, groups = group_grad_norms(opt.param_groups)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    per_group = [
        torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])
        for ps in (no_decay, decay)
    ]
    assert [g.item() for g in groups] == pytest.approx([g.item() for g in per_group], rel=1e-6)

    callback, logger = GradNorm(interval=3), Recorder()
    for batch in range(4):
        state = SimpleNamespace(
            timestamp=Timestamp(batch=batch), optimizers=[opt], fsdp_enabled=False
        )
        callback.after_train_batch(state, logger)  # type: ignore[arg-type]
    assert len(logger.metrics) == 2  # batches 0 and 3
    assert logger.metrics[0]["grad_norm/total"] == pytest.approx(expected.item(), rel=1e-6)
    assert set(logger.metrics[0]) == {"grad_norm/total", "grad_norm/group0", "grad_norm/group1"}


# ---------------------------------------------------------------- HF export


def test_hf_export_calls_interop(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    fake = ModuleType("ettin.interop")
    fake.export_hf = lambda model, out_dir, tokenizer=None, **options: calls.append(
        (model, out_dir, tokenizer, options)
    )  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ettin.interop", fake)
    composer_model = nn.Module()
    composer_model.model = nn.Linear(2, 2)  # the wrapped EttinModel
    state = SimpleNamespace(model=composer_model, fsdp_enabled=False)
    export = HFExport(tmp_path / "hf", tokenizer_dir="tok", max_seq_len=128, objectives=["mlm"])
    export.fit_end(state, Recorder())  # type: ignore[arg-type]
    options = {"max_seq_len": 128, "objectives": ["mlm"]}  # recorded in the export
    assert calls == [(composer_model.model, tmp_path / "hf", "tok", options)]


# ---------------------------------------------------------------- inside a Composer run


def test_callbacks_in_a_composer_run() -> None:
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerModel

    from ettin.callbacks import LRMonitor
    from ettin.config import SchedulerConfig
    from ettin.optim import WarmupStableDecay

    class Toy(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8), nn.Linear(8, 16))

        def forward(self, batch):
            return self.model(batch["input_ids"])

        def loss(self, outputs, batch):
            return nn.functional.cross_entropy(outputs.flatten(0, 1), batch["input_ids"].flatten())

    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 16, (2, 6), generator=gen), "attention_mask": MASK.clone()}
        for _ in range(4)
    ]
    model = Toy()
    norm, rest = (
        list(model.model[1].parameters()),
        [model.model[0].weight, *model.model[2].parameters()],
    )
    opt = torch.optim.AdamW([{"params": norm}, {"params": rest}], lr=1e-2)
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=batches,
        max_duration="4ba",
        device_train_microbatch_size=1,  # two microbatches: accumulated gradients
        optimizers=opt,
        schedulers=WarmupStableDecay(SchedulerConfig(t_warmup="2ba", t_decay="2ba", alpha_f=0.5)),
        callbacks=[GradNorm(2), PackingEfficiency(2), Throughput(window=2), LRMonitor()],
        loggers=[memory],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    data = memory.data
    assert len(data["grad_norm/total"]) == 2 and data["grad_norm/total"][0][1] > 0
    assert "grad_norm/group1" in data
    assert [v for _, v in data["trainer/packing_efficiency"]] == pytest.approx([0.75, 0.75])
    assert "throughput/device/mfu" not in data  # no peak on CPU
    (_, tokens), (_, samples) = (
        data["throughput/tokens_per_sec"][0],
        data["throughput/samples_per_sec"][0],
    )
    assert tokens / samples == pytest.approx(9 / 3)  # the whole device batch, not one microbatch
    lrs = [v for _, v in data["lr-AdamW/group0"]]
    assert lrs == pytest.approx(
        [0.0, 0.5e-2, 1e-2, 0.75e-2]
    )  # warm-up 2 batches, linear decay to 0.5
