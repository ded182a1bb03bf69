"""StableAdamW against a hand-written copy of the reference algorithm, param groups, the LR schedule."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from composer.core import Time, Timestamp
from torch import nn

from ettin.config import OptimConfig, SchedulerConfig
from ettin.optim import WarmupStableDecay, build_optimizer, param_groups

# ---------------------------------------------------------------- StableAdamW, reference §5.4


def reference_stableadamw(params, grads_per_step, *, lrs, max_lr, betas, eps, wds):
    """Recipe §5.4 written out in float64: one group per (param, wd); returns params and RMS ratios."""
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ratios = []

    def debias(beta, k):
        return (beta**k - beta) / (beta**k - 1)

    for k, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        b1, b2 = debias(betas[0], k), debias(betas[1], k)
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = math.sqrt((g * g / torch.clamp(v[i], min=eps**2)).mean().item())
            ratios.append(r)
            lr_p = lr / max(1.0, r)
            if wds[i] != 0:
                params[i] = params[i] * (1 - (lr_p / max_lr) * wds[i])
            params[i] = params[i] - lr_p * m[i] / (v[i].sqrt() + eps)
    return params, ratios


def _toy_tensors():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=gen)
    bias = torch.randn(3, generator=gen)
    # Step 2 gradients are 10x step 1 (RMS ratio > 1: update clipping is exercised); step 3 small.
    g1 = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    g2 = [10 * torch.randn(4, 3, generator=gen), 10 * torch.randn(3, generator=gen)]
    g3 = [0.1 * torch.randn(4, 3, generator=gen), 0.1 * torch.randn(3, generator=gen)]
    return [weight, bias], [g1, g2, g3]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_stableadamw_matches_reference(
    steps: int, foreach: bool, dtype: torch.dtype, tol: float
) -> None:
    from optimi import StableAdamW

    (weight, bias), grads = _toy_tensors()
    max_lr, wd, betas, eps = 1e-2, 0.1, (0.9, 0.98), 1e-6
    lrs = [max_lr, 0.5 * max_lr, 0.25 * max_lr][:steps]  # scheduled below the peak after step 1
    w, b = nn.Parameter(weight.to(dtype, copy=True)), nn.Parameter(bias.to(dtype, copy=True))
    groups = [{"params": [b], "weight_decay": 0.0}, {"params": [w], "weight_decay": wd}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimi 0.3: foreach deprecated; wd 0.1 "potentially high"
        opt = StableAdamW(
            groups,
            lr=max_lr,
            betas=betas,
            eps=eps,
            weight_decay=wd,
            decouple_lr=True,
            max_lr=max_lr,
            foreach=foreach,
        )
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        # Copies: optimi's foreach path reuses the gradients as scratch space.
        w.grad, b.grad = (g.to(dtype, copy=True) for g in grads[step])
        opt.step()

    (ref_w, ref_b), ratios = reference_stableadamw(
        [weight, bias], grads[:steps], lrs=lrs, max_lr=max_lr, betas=betas, eps=eps, wds=[wd, 0.0]
    )
    if steps == 3:
        assert max(ratios) > 1.0, "the toy gradients must trigger update clipping"
    assert (w.detach().double() - ref_w).abs().max().item() < tol
    assert (b.detach().double() - ref_b).abs().max().item() < tol
    assert (w.detach().double() - weight.double()).abs().max().item() > 1e-3  # it moved


class TiedToy(nn.Module):
    """Embedding + norm + dense + tied decoder with a bias: the shapes that matter for grouping."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4, bias=False)
        self.dense = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 10, bias=True)
        self.decoder.weight = self.embeddings.weight
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_param_groups_split_and_tied_weight_once() -> None:
    model = TiedToy()
    no_decay, decay = param_groups(model, 0.01)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(no_decay) == {id(model.norm.weight), id(model.decoder.bias)}
    assert ids(decay) == {id(model.embeddings.weight), id(model.dense.weight)}
    assert len(decay["params"]) == 2  # the tied embedding/decoder weight is counted once
    assert model.decoder.weight is model.embeddings.weight


def test_build_optimizer_settings() -> None:
    cfg = OptimConfig(lr=3e-3, weight_decay=3e-4, betas=[0.9, 0.98], eps=1e-6)
    opt = build_optimizer(TiedToy(), cfg)
    assert type(opt).__name__ == "StableAdamW"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 3e-4]
    for group in opt.param_groups:
        assert group["decouple_lr"] is True and group["max_lr"] == 3e-3 and group["lr"] == 3e-3
        assert (group["beta1"], group["beta2"], group["eps"]) == (0.9, 0.98, 1e-6)
        assert group["kahan_sum"] is None  # optimi turns it on for bf16/fp16 params only


# ---------------------------------------------------------------- schedule


def fake_state(now: int, max_duration: str, unit: str = "tok") -> SimpleNamespace:
    """Just what a Composer scheduler reads: the timestamp and max_duration."""
    stamp = Timestamp(token=now) if unit == "tok" else Timestamp(batch=now)
    return SimpleNamespace(timestamp=stamp, max_duration=Time.from_timestring(max_duration))


B = 1_000_000_000


def ref_wsd(t: float, warm: float, decay: float, total: float, alpha: float) -> float:
    """Recipe §5.1 (warm-up from 0 rather than 1e-10)."""
    if t < warm:
        return t / warm
    if t < total - decay:
        return 1.0
    return max(0.0, 1 - (t - (total - decay)) / decay * (1 - alpha))


def ref_one_minus_sqrt(t: float, total: float, alpha: float) -> float:
    """Recipe §5.2 with t_decay = t_max = max_duration."""
    return max(alpha, alpha + (1 - alpha) * (1 - math.sqrt(t / total)))


PHASES = {
    # name: (SchedulerConfig, max_duration, reference multiplier at t)
    "phase1-wsd": (
        SchedulerConfig(t_warmup="3_000_000_000tok", t_decay="0tok", alpha_f=0.02),
        "1_700_000_000_000tok",
        lambda t: ref_wsd(t, 3 * B, 0, 1700 * B, 0.02),
    ),
    "phase2-1sqrt": (
        SchedulerConfig(t_warmup="0tok", t_decay="1dur", alpha_f=0.5, decay_shape="1-sqrt"),
        "250_000_000_000tok",
        lambda t: ref_one_minus_sqrt(t, 250 * B, 0.5),
    ),
    "phase3-1sqrt": (
        SchedulerConfig(t_warmup="0tok", t_decay="1dur", alpha_f=0.04, decay_shape="1-sqrt"),
        "50_000_000_000tok",
        lambda t: ref_one_minus_sqrt(t, 50 * B, 0.04),
    ),
    "cross-linear": (
        SchedulerConfig(t_warmup="3_000_000_000tok", t_decay="10_000_000_000tok", alpha_f=0.02),
        "50_000_000_000tok",
        lambda t: ref_wsd(t, 3 * B, 10 * B, 50 * B, 0.02),
    ),
}


@pytest.mark.parametrize("name", list(PHASES))
def test_schedule_matches_reference(name: str) -> None:
    cfg, max_duration, reference = PHASES[name]
    scheduler = WarmupStableDecay(cfg)
    total = Time.from_timestring(max_duration).value
    fractions = [0, 1e-4, 0.01, 0.03, 0.05, 0.06, 0.1, 0.33, 0.5, 0.79, 0.8, 0.81, 0.9, 0.99, 1.0]
    points = sorted(
        {int(f * total) for f in fractions} | {3 * B - 1, 3 * B, 40 * B, 40 * B + 1, 45 * B}
    )
    for t in points:
        if t >= total:  # the reference is undefined at t = T when t_decay = 0
            continue
        got = scheduler(fake_state(t, max_duration))
        assert got == pytest.approx(reference(t), abs=1e-12), (name, t)


def test_schedule_end_points() -> None:
    cross = WarmupStableDecay(PHASES["cross-linear"][0])
    assert cross(fake_state(0, "50_000_000_000tok")) == 0.0
    assert cross(fake_state(50 * B, "50_000_000_000tok")) == pytest.approx(0.02)
    phase3 = WarmupStableDecay(PHASES["phase3-1sqrt"][0])
    assert phase3(fake_state(0, "50_000_000_000tok")) == 1.0
    assert phase3(fake_state(50 * B, "50_000_000_000tok")) == pytest.approx(0.04)


def test_schedule_in_batches_and_ssr() -> None:
    sched = WarmupStableDecay(SchedulerConfig(t_warmup="10ba", t_decay="0.5dur"))
    values = [sched(fake_state(b, "100ba", unit="ba")) for b in (0, 5, 10, 50, 75, 100)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.5, 0.0])
    # ssr stretches absolute lengths (the trainer already stretched max_duration).
    assert sched(fake_state(5, "200ba", unit="ba"), ssr=2.0) == pytest.approx(0.25)


def test_schedule_rejects_bad_settings() -> None:
    from ettin.config import ConfigError

    with pytest.raises(ConfigError, match="decay_shape"):
        SchedulerConfig(decay_shape="cosine")
    with pytest.raises(ConfigError, match="alpha_f"):
        SchedulerConfig(alpha_f=1.5)
    with pytest.raises(ConfigError, match="t_decay='2dur' is longer than the run"):
        SchedulerConfig(t_decay="2dur")
    with pytest.raises(ConfigError, match="t_warmup='5s': use tok, ba"):
        SchedulerConfig(t_warmup="5s")
    with pytest.raises(ValueError, match="same unit"):
        WarmupStableDecay(SchedulerConfig(t_decay="10ba"))(fake_state(0, "100tok"))
