"""EttinModel invariants: sizes, init, tying, causality, windows, unpadding, losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from ettin.model import (
    SIZES,
    EttinModel,
    ModelArgs,
    attention,
    model_args,
    next_token_positions,
    parameter_count,
    unpad,
)

VOCAB = 256


def tiny(causal: bool = False, **overrides) -> EttinModel:
    """The `test` preset with a small vocabulary, weights spread so every path matters."""
    torch.manual_seed(0)
    args = model_args("test", vocab_size=VOCAB, pad_token_id=0, causal=causal, **overrides)
    model = EttinModel(args).eval()
    with torch.no_grad():  # init std 0.02 gives near-uniform attention; make it peaky
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) ids and segment-id mask for sequences of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


# --- sizes -------------------------------------------------------------------------------------

REFERENCE_COUNTS = {
    "17m": 16_913_600,
    "32m": 32_081_344,
    "68m": 68_457_664,
    "150m": 149_655_232,
    "400m": 395_881_664,
    "1b": 1_031_314_112,
}


@pytest.mark.parametrize("size", list(REFERENCE_COUNTS))
@pytest.mark.parametrize("causal", [False, True])
def test_parameter_counts_match_reference(size, causal):
    args = model_args(size, causal=causal)
    with torch.device("meta"):
        model = EttinModel(args)
    counted = sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert counted == REFERENCE_COUNTS[size]
    counts = parameter_count(args)
    assert counts["total"] == REFERENCE_COUNTS[size]
    assert counts["non_embedding"] == counted - args.vocab_size * args.hidden_size


def test_presets_have_global_first_and_last_layers():
    for size in SIZES:
        args = model_args(size)
        assert args.is_global(0) and args.is_global(args.num_layers - 1), size


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(hidden_size=100, num_heads=3),
            r"hidden_size \(100\) must be a multiple of num_heads \(3\)",
        ),
        (dict(local_attention=15), r"local_attention \(15\) must be even"),
        (dict(num_layers=0), r"num_layers must be positive"),
        (dict(pad_token_id=1000), r"pad_token_id \(1000\) must be in \[0, vocab_size=256\)"),
    ],
)
def test_model_args_validation(kwargs, message):
    base = dict(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**base, **kwargs})


def test_unknown_size_lists_valid_sizes():
    with pytest.raises(
        ValueError, match="unknown model size '2b'; valid sizes: 17m, 32m, 68m, 150m, 400m, 1b"
    ):
        model_args("2b")


# --- init and tying ----------------------------------------------------------------------------


def test_encoder_and_decoder_start_identical():
    models = []
    for causal in (False, True):
        torch.manual_seed(123)
        models.append(EttinModel(model_args("test", vocab_size=VOCAB, causal=causal)))
    enc, dec = (m.state_dict() for m in models)
    assert list(enc) == list(dec)
    assert "model.layers.0.attn_norm.weight" not in enc and "model.layers.1.attn_norm.weight" in enc
    for name in enc:
        assert torch.equal(enc[name], dec[name]), name


def test_decoder_weight_is_the_token_embedding():
    model = EttinModel(model_args("test", vocab_size=VOCAB))
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    state = model.state_dict()
    assert (
        state["decoder.weight"].data_ptr()
        == state["model.embeddings.tok_embeddings.weight"].data_ptr()
    )


def test_init_std_per_group_and_truncation():
    torch.manual_seed(0)
    model = EttinModel(model_args("17m"))
    std = 0.02
    out_std = std / math.sqrt(2 * 7)
    groups = {
        "model.embeddings.tok_embeddings.weight": std,
        "attn.Wqkv.weight": std,
        "attn.Wo.weight": out_std,
        "mlp.Wi.weight": std,
        "mlp.Wo.weight": out_std,
        "head.dense.weight": std,
    }
    truncated_std = 0.8796  # std of a standard normal truncated at +-2
    state = model.state_dict()
    for suffix, sigma in groups.items():
        w = torch.cat([t.flatten() for name, t in state.items() if name.endswith(suffix)])
        assert w.std().item() == pytest.approx(truncated_std * sigma, rel=0.02), suffix
        assert w.abs().max().item() <= 2 * sigma * (1 + 1e-6), suffix
        assert w.abs().max().item() >= 1.95 * sigma, suffix
    assert torch.count_nonzero(model.decoder.bias) == 0
    norms = [t for name, t in state.items() if "norm" in name]
    assert (
        len(norms) == 2 + 7 * 2 - 1 + 1
    )  # embedding, final, per-layer (no layer-0 attn_norm), head
    assert all(torch.equal(t, torch.ones_like(t)) for t in norms)


def test_padding_idx_is_the_pad_id_and_gets_no_gradient():
    model = EttinModel(model_args("test", vocab_size=VOCAB, pad_token_id=3))
    embedding = model.model.embeddings.tok_embeddings
    assert embedding.padding_idx == 3
    embedding(
        torch.tensor([5, 3, 7])
    ).sum().backward()  # the lookup alone (the tied head is separate)
    assert embedding.weight.grad[3].abs().sum() == 0 and embedding.weight.grad[5].abs().sum() > 0


# --- attention pattern -------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_causality(causal):
    model = tiny(causal)
    ids, mask = batch([24, 17])
    t = 10
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % (VOCAB - 1) + 1
    with torch.no_grad():
        before, after = model.padded_logits(ids, mask), model.padded_logits(changed, mask)
    prefix_diff = (before[:, : t + 1] - after[:, : t + 1]).abs().max().item()
    if causal:
        assert prefix_diff == 0.0
    else:
        assert prefix_diff > 1e-3


def one_local_layer(causal: bool, local_attention: int, **overrides) -> EttinModel:
    """A single local-attention block: build layers [global, local] and keep only the local one."""
    model = tiny(
        causal,
        num_layers=2,
        global_attn_every_n_layers=2,
        local_attention=local_attention,
        **overrides,
    )
    model.model.layers = model.model.layers[1:]
    return model


@pytest.mark.parametrize("attn_impl", ["torch", "flex"])
@pytest.mark.parametrize(
    "causal, rule, visible, hidden",
    [
        (False, "hf", [70 - 64, 70, 70 + 64], [70 - 65, 70 + 65]),  # |i - j| <= 64: 129 keys
        (False, "reference", [70 - 64, 70, 70 + 64], [70 - 65, 70 + 65]),  # the same rule
        (True, "hf", [70 - 63, 70], [70 - 64, 71]),  # i - 64 < j <= i: 64 keys incl. self
        (True, "reference", [70 - 64, 70], [70 - 65, 71]),  # i - 64 <= j <= i: 65 keys
    ],
)
def test_local_window_edges(causal, rule, visible, hidden, attn_impl):
    model = one_local_layer(causal, local_attention=128, causal_window=rule)
    model.attn_impl = attn_impl
    ids, mask = batch([140])
    query = 70
    with torch.no_grad():
        base = model.padded_logits(ids, mask)[0, query]
        for key in visible + hidden:
            changed = ids.clone()
            changed[0, key] = changed[0, key] % (VOCAB - 1) + 1
            diff = (model.padded_logits(changed, mask)[0, query] - base).abs().max().item()
            assert (diff > 1e-4) if key in visible else (diff == 0.0), (key, diff)


# --- unpadding -------------------------------------------------------------------------------


def test_unpad_exact_layout():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 2, 2, 3], [1, 1, 0, 1, 1]])
    ids = torch.arange(15).view(3, 5)
    b = unpad(ids, mask)
    assert b.indices.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 13, 14]
    assert b.input_ids.tolist() == b.indices.tolist()
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 3, 5, 7, 8, 10, 12]  # a run of 1s after padding is new
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    assert b.seq_index.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5]
    assert b.max_seqlen == 5 and b.shape == (3, 5) and not b.dense
    assert next_token_positions(b.cu_seqlens, b.num_tokens).tolist() == [0, 1, 3, 5, 8, 10]


@pytest.mark.parametrize("causal", [False, True])
def test_padded_unpadded_and_packed_agree(causal):
    model = tiny(causal, local_attention=8)
    lengths = [12, 7, 20]
    ids, mask = batch(lengths)
    seqs = [ids[i, :n] for i, n in enumerate(lengths)]
    with torch.no_grad():
        alone = [model.padded_logits(s[None], torch.ones_like(s[None]))[0] for s in seqs]
        padded = model.padded_logits(ids, mask)
        packed_ids = torch.cat(seqs)[None]  # one row, segment ids 1, 2, 3
        packed_mask = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])[None]
        packed = model.padded_logits(packed_ids, packed_mask)[0]
        # two packed rows with padding: [seq0 | seq1 | pad], [seq2]
        rows_ids = torch.zeros(2, 20, dtype=torch.long)
        rows_mask = torch.zeros(2, 20, dtype=torch.long)
        rows_ids[0, :19], rows_mask[0, :12], rows_mask[0, 12:19] = torch.cat(seqs[:2]), 1, 2
        rows_ids[1], rows_mask[1] = seqs[2], 1
        rows = model.padded_logits(rows_ids, rows_mask)
    offsets = [0, 12, 19]
    for k, n in enumerate(lengths):
        torch.testing.assert_close(padded[k, :n], alone[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[offsets[k] : offsets[k] + n], alone[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[0, :12], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[0, 12:19], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1], alone[2], atol=1e-5, rtol=0)
    assert padded[1, 7:].abs().max() == 0  # padding is zero-filled


def fake_flash_varlen(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
):
    """flash_attn_varlen_func's documented semantics, naively in fp32: per cu_seqlens segment,
    query i sees keys i - window_size[0] <= j <= i + window_size[1] (-1 = unlimited), j <= i if causal.
    The keyword names are flash-attn 2's, so a misspelt keyword fails here too."""
    out = torch.empty(q.shape, dtype=torch.float32)
    left, right = window_size
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        ok = (
            ((left < 0) | (j >= i - left))
            & ((right < 0) | (j <= i + right))
            & ((j <= i) | (not causal))
        )
        scores = torch.einsum("ihd,jhd->hij", q[start:end].float(), k[start:end].float())
        scores = (scores / q.shape[-1] ** 0.5).masked_fill(~ok, float("-inf"))
        out[start:end] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[start:end].float())
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_flash_call_agrees_with_torch_backend(monkeypatch, causal, local):
    """Our flash arguments (cu_seqlens, window_size, causal) mean what the torch mask means."""
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_flash_varlen)
    args = model_args("test", causal=causal, local_attention=8)
    window = args.local_window if local else attention.GLOBAL_WINDOW
    mask = torch.tensor([[1] * 11 + [2] * 6 + [0] * 3, [1] * 20, [1] * 5 + [0] * 15])
    batch = unpad(torch.zeros_like(mask), mask)
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(batch.num_tokens, 4, 16, generator=g) for _ in range(3))
    q, k, v = (t.bfloat16().float() for t in (q, k, v))  # exact through the kernel's bf16 cast
    expected = attention.torch_attention(q, k, v, batch, window, causal)
    got = attention.flash_attention(q, k, v, batch, window, causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_flash(monkeypatch, deterministic):
    """`EttinModel.deterministic` is passed to flash_attn_varlen_func in every layer."""
    calls = []

    def recording_flash(*args, **kwargs):
        calls.append(kwargs)
        return fake_flash_varlen(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_varlen_func", recording_flash)
    model = tiny(causal=False, local_attention=8)
    model.attn_impl, model.deterministic = "flash", deterministic
    ids, mask = batch([12, 7])
    model(ids, mask, torch.where(mask.bool(), ids, -100)).loss.backward()
    assert len(calls) == model.args.num_layers
    assert all(c["deterministic"] is deterministic for c in calls)
    assert [c["window_size"] for c in calls] == [
        (-1, -1) if model.args.is_global(i) else model.args.local_window
        for i in range(model.args.num_layers)
    ]


# --- losses ------------------------------------------------------------------------------------


def test_clm_loss_matches_naive_per_sequence_loop():
    model = tiny(causal=True, local_attention=8)
    lengths = [12, 1, 20, 5]
    ids, mask = batch(lengths)
    out = model(ids, mask)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, n in enumerate(lengths):
            seq = ids[i : i + 1, :n]
            logits = model.padded_logits(seq, torch.ones_like(seq))[0]
            total += F.cross_entropy(logits[:-1], seq[0, 1:], reduction="sum").item()
            count += n - 1
    assert out.num_targets.item() == count == sum(lengths) - len(lengths)
    assert out.logits.shape == (count, VOCAB) and out.targets.shape == (count,)
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


def test_mlm_loss_matches_naive_masked_cross_entropy():
    model = tiny(causal=False, local_attention=8)
    ids, mask = batch([12, 20, 5])
    g = torch.Generator().manual_seed(2)
    selected = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    labels = torch.where(selected, ids, -100)
    out = model(ids, mask, labels)
    with torch.no_grad():
        logits = model.padded_logits(ids, mask)
    expected = F.cross_entropy(logits[selected], ids[selected])
    assert out.num_targets.item() == selected.sum().item()
    torch.testing.assert_close(out.logits, logits[selected], atol=1e-5, rtol=0)
    assert torch.equal(out.targets, ids[selected])
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="MLM forward needs labels"):
        model(ids, mask)


def test_no_targets_gives_zero_loss_and_backward_works():
    model = tiny(causal=False)
    ids, mask = batch([6, 4])
    out = model(ids, mask, torch.full_like(ids, -100))
    assert out.num_targets.item() == 0 and out.loss.item() == 0.0
    labels = torch.where(mask.bool(), ids, -100)
    model(ids, mask, labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
