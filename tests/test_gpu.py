"""GPU only: the flash-attn varlen backend agrees with the exact torch backend (bf16 tolerance)."""

import importlib.util

import pytest
import torch

from ettin.model import EttinModel, model_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None,
        reason="needs flash-attn: pip install -e '.[gpu]'",
    ),
]

VOCAB = 256


def tiny(causal: bool) -> EttinModel:
    torch.manual_seed(0)
    args = model_args("test", vocab_size=VOCAB, pad_token_id=0, causal=causal, local_attention=16)
    model = EttinModel(args).cuda().eval()
    with torch.no_grad():  # peaky attention, so a wrong window or mask shows
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def packed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: three packed sequences then padding; row 1: one sequence; row 2: padding-heavy."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 96), generator=g)
    mask = torch.zeros(3, 96, dtype=torch.long)
    mask[0, :40], mask[0, 40:45], mask[0, 45:90] = 1, 2, 3
    mask[1, :] = 1
    mask[2, :7] = 1
    return (ids * mask.clamp(max=1)).cuda(), mask.cuda()


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_flash_matches_torch_backend(causal):
    model = tiny(causal)
    ids, mask = packed_batch()
    labels = torch.where((ids % 3 == 0) & (mask > 0), ids, -100)
    results = {}
    for impl in ("flash", "torch"):
        model.attn_impl = impl
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.padded_logits(ids, mask).float()
            loss = model(ids, mask, None if causal else labels).loss.float()
        results[impl] = logits, loss
    (flash_logits, flash_loss), (torch_logits, torch_loss) = results["flash"], results["torch"]
    real = mask > 0
    diff = (flash_logits - torch_logits)[real].abs().max().item()
    print(f"{'decoder' if causal else 'encoder'}: flash vs torch max |diff| = {diff:.3g}")
    assert diff < 0.1  # bf16 logits of magnitude ~5
    assert flash_loss.item() == pytest.approx(torch_loss.item(), abs=2e-2)
