"""Reference (FlexBert/Composer) checkpoints -> ettin: weights, optimiser moments, time, errors.

The synthetic checkpoints are built here from the documented layout (reference recipe §6.1,
names of §1.2/§6.3): `state.model` with `model.bert....`, `model.head.*`/`model.lm_head.*`,
`model.decoder.*`; StableAdamW state keyed by those names (Composer >= 0.24 with torch >= 2.3)
or by torch's integer ids; `state.timestamp`; `state.integrations.huggingface` with the
FlexBertConfig. Tiny shapes, no download.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, losses, tiny_config, tiny_overrides

from ettin.interop.reference import (
    ReferenceFormatError,
    ettin_name,
    read_reference,
    reference_model_args,
)
from ettin.model import EttinModel, ModelArgs
from ettin.resume import check_fits_run

L, H, INTER, HEADS, V = 4, 64, 96, 4, 72


def flex_config(causal: bool, **extra) -> dict:
    """A FlexBertConfig dict as Composer's HuggingFaceModel.get_metadata stores it."""
    cfg = {
        "model_type": "bert",
        "num_hidden_layers": L,
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "vocab_size": V,
        "rotary_emb_base": 10000.0,
        "local_attn_rotary_emb_base": -1,
        "sliding_window": 128,
        "global_attn_every_n_layers": 3,
        "norm_kwargs": {"eps": 1e-05, "bias": False},
        "attn_qkv_bias": False,
        "attn_out_bias": False,
        "mlp_in_bias": False,
        "mlp_out_bias": False,
        "decoder_bias": True,
        "hidden_act": "gelu",
        "head_pred_act": "gelu",
        "bert_layer": "prenorm",
        "mlp_layer": "glu",
        "embedding_layer": "sans_pos",
        "skip_first_prenorm": True,
        "final_norm": True,
        "embed_norm": True,
        "masked_prediction": not causal,
        "init_std": 0.02,
        "pad_token_id": 0,
        "attn_out_dropout_prob": 0.1,
    }
    if causal:
        cfg["causal_mask"] = True
    cfg.update(extra)
    return cfg


def flex_names(causal: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The documented FlexBert state-dict names and shapes, in module order."""
    head = "lm_head" if causal else "head"
    names = [
        ("model.bert.embeddings.tok_embeddings.weight", (V, H)),
        ("model.bert.embeddings.norm.weight", (H,)),
    ]
    for i in range(L):
        p = f"model.bert.encoder.layers.{i}."
        if i >= 1:
            names.append((p + "attn_norm.weight", (H,)))
        names += [
            (p + "attn.Wqkv.weight", (3 * H, H)),
            (p + "attn.Wo.weight", (H, H)),
            (p + "mlp_norm.weight", (H,)),
            (p + "mlp.Wi.weight", (2 * INTER, H)),
            (p + "mlp.Wo.weight", (H, INTER)),
        ]
    names += [
        ("model.bert.final_norm.weight", (H,)),
        (f"model.{head}.dense.weight", (H, H)),
        (f"model.{head}.norm.weight", (H,)),
        ("model.decoder.weight", (V, H)),
        ("model.decoder.bias", (V,)),
    ]
    return names


def composer_tokenizer_state(tokenizer) -> dict:
    """`state.integrations.huggingface.tokenizer` as Composer's `HuggingFaceModel` stores it
    (`get_metadata` of a model built with `tokenizer`, as the reference's `create_flex_bert_*`
    builds it): each file of `save_pretrained` by name, `.json` parsed, `.txt` as lines."""
    from composer.models import HuggingFaceModel
    from transformers import BertConfig, BertForMaskedLM

    hf = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    )
    return HuggingFaceModel(hf, tokenizer=tokenizer).get_metadata()["tokenizer"]


def reference_payload(
    causal: bool,
    *,
    seed: int = 0,
    optimizer: str = "names",
    step: int = 7,
    tokenizer_state: dict | None = None,
) -> dict:
    """A reference Composer checkpoint with random weights and moments (and the tokenizer files
    of `tokenizer_state`, `composer_tokenizer_state`; none by default)."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for name, shape in flex_names(causal):
        model[name] = (
            1.0 + 0.1 * torch.randn(shape, generator=g)
            if name.endswith("norm.weight")
            else 0.2 * torch.randn(shape, generator=g)
        )
    model["model.decoder.weight"] = model["model.bert.embeddings.tok_embeddings.weight"]
    params = [k for k in model if k != "model.decoder.weight"]
    no_decay = [k for k in params if model[k].ndim <= 1 or k.endswith(".bias")]
    decay = [k for k in params if k not in no_decay]
    moments = {
        k: {
            "exp_avg": torch.randn(model[k].shape, generator=g),
            "exp_avg_sq": torch.rand(model[k].shape, generator=g),
        }
        for k in params
    }
    groups = [
        {"lr": 1e-3, "weight_decay": 0.0, "step": torch.tensor(step), "params": no_decay},
        {"lr": 1e-3, "weight_decay": 1e-5, "step": torch.tensor(step), "params": decay},
    ]
    if optimizer == "ids":  # torch's native optimizer.state_dict(), a per-param step
        ids = {k: i for i, k in enumerate(no_decay + decay)}
        moments = {ids[k]: {**v, "step": torch.tensor(float(step))} for k, v in moments.items()}
        groups = [
            {
                **{k: v for k, v in gr.items() if k != "step"},
                "params": [ids[p] for p in gr["params"]],
            }
            for gr in groups
        ]
    timestamp = {
        "epoch": 0,
        "batch": step,
        "sample": 8 * step,
        "token": 1000 * step,
        "batch_in_epoch": step,
        "sample_in_epoch": 8 * step,
        "token_in_epoch": 1000 * step,
    }
    return {
        "state": {
            "model": model,
            "optimizers": {"StableAdamW": {"state": moments, "param_groups": groups}},
            "schedulers": {"LambdaLR": {"base_lrs": [1e-3, 1e-3], "last_epoch": step}},
            "timestamp": {"Timestamp": timestamp},
            "rank_zero_seed": 21,
            "run_name": "reference-run",
            "integrations": {
                "huggingface": {
                    "model": {
                        "config": {
                            "file_extension": ".json",
                            "content": flex_config(causal),
                            "class": "src.bert_layers.model.FlexBertForMaskedLM",
                        }
                    },
                    "tokenizer": tokenizer_state or {},
                }
            },
        },
        "rng": [{}],
    }


def set_by_hand(model: EttinModel, flex: dict[str, torch.Tensor], causal: bool) -> None:
    """Copy the FlexBert tensors into our modules attribute by attribute (no name mapping)."""
    head = "lm_head" if causal else "head"
    with torch.no_grad():
        b = model.model
        b.embeddings.tok_embeddings.weight.copy_(
            flex["model.bert.embeddings.tok_embeddings.weight"]
        )
        b.embeddings.norm.weight.copy_(flex["model.bert.embeddings.norm.weight"])
        for i, layer in enumerate(b.layers):
            p = f"model.bert.encoder.layers.{i}."
            if i >= 1:
                layer.attn_norm.weight.copy_(flex[p + "attn_norm.weight"])
            layer.attn.Wqkv.weight.copy_(flex[p + "attn.Wqkv.weight"])
            layer.attn.Wo.weight.copy_(flex[p + "attn.Wo.weight"])
            layer.mlp_norm.weight.copy_(flex[p + "mlp_norm.weight"])
            layer.mlp.Wi.weight.copy_(flex[p + "mlp.Wi.weight"])
            layer.mlp.Wo.weight.copy_(flex[p + "mlp.Wo.weight"])
        b.final_norm.weight.copy_(flex["model.bert.final_norm.weight"])
        model.head.dense.weight.copy_(flex[f"model.{head}.dense.weight"])
        model.head.norm.weight.copy_(flex[f"model.{head}.norm.weight"])
        model.decoder.bias.copy_(flex["model.decoder.bias"])


@pytest.mark.parametrize("causal", [False, True])
def test_weights_land_on_the_right_tensors(tmp_path, causal):
    from ettin.checkpoint import load_weights

    payload = reference_payload(causal)
    torch.save(payload, tmp_path / "ref.pt")
    ref = read_reference(tmp_path / "ref.pt")
    assert ref.model_args.causal is causal and ref.objective == ("clm" if causal else "mlm")
    assert ref.model_args.num_layers == L and ref.model_args.intermediate_size == INTER
    ours = EttinModel(ref.model_args)
    load_weights(ours, ref.state, source="ref")
    by_hand = EttinModel(ref.model_args)
    set_by_hand(by_hand, payload["state"]["model"], causal)
    ids = torch.randint(0, V - 8, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ours.eval(), by_hand.eval()
    with torch.no_grad():
        a, b = ours.padded_logits(ids, mask), by_hand.padded_logits(ids, mask)
    assert torch.equal(a, b)
    # and not trivially: a fresh model computes something else
    assert not torch.allclose(a, EttinModel(ref.model_args).eval().padded_logits(ids, mask))
    assert ref.timestamp["batch"] == 7 and ref.timestamp["token"] == 7000


@pytest.mark.parametrize("layout", ["names", "ids"])
def test_optimizer_moments_land_on_the_right_params(tmp_path, layout):
    payload = reference_payload(False, optimizer=layout, step=5)
    torch.save(payload, tmp_path / "ref.pt")
    ref = read_reference(tmp_path / "ref.pt")
    opt = payload["state"]["optimizers"]["StableAdamW"]["state"]
    key = "model.bert.encoder.layers.2.mlp.Wi.weight"
    if layout == "ids":
        order = [
            p
            for g in payload["state"]["optimizers"]["StableAdamW"]["param_groups"]
            for p in g["params"]
        ]
        params = [k for k in payload["state"]["model"] if k != "model.decoder.weight"]
        decay = [k for k in params if payload["state"]["model"][k].ndim == 2]
        no_decay = [k for k in params if k not in decay]
        key = order[(no_decay + decay).index(key)]
    got = ref.moments["model.layers.2.mlp.Wi.weight"]
    assert torch.equal(got["exp_avg"], opt[key]["exp_avg"])
    assert torch.equal(got["exp_avg_sq"], opt[key]["exp_avg_sq"])
    assert set(ref.steps.values()) == {5}
    assert len(ref.moments) == len(flex_names(False)) - 1  # the tied decoder weight once


def test_unknown_or_mismatched_tensors_are_refused_by_name(tmp_path):
    payload = reference_payload(False)
    payload["state"]["model"]["model.bert.encoder.layers.1.attn.Wqkv.bias"] = torch.zeros(3 * H)
    with pytest.raises(ReferenceFormatError, match=r"layers\.1\.attn\.Wqkv\.bias"):
        read_reference(tmp_path / "x.pt", payload=payload)
    assert ettin_name("model.bert.encoder.layers.3.mlp.Wo.weight") == "model.layers.3.mlp.Wo.weight"
    assert ettin_name("model.lm_head.dense.weight") == "head.dense.weight"
    with pytest.raises(ReferenceFormatError, match="skip_first_prenorm"):
        ettin_name("model.bert.encoder.layers.0.attn_norm.weight")
    # a config of another size than the tensors: the first misfit tensor is named
    from ettin.checkpoint import CheckpointError, load_weights

    payload = reference_payload(False)
    payload["state"]["integrations"]["huggingface"]["model"]["config"]["content"][
        "intermediate_size"
    ] = 128
    ref = read_reference(tmp_path / "x.pt", payload=payload)
    with pytest.raises(CheckpointError, match=r"mlp\.Wi\.weight.*\(256, 64\).*\(192, 64\)"):
        load_weights(EttinModel(ref.model_args), ref.state, source="ref.pt")
    # the head and the config disagree about the objective
    payload = reference_payload(True)
    payload["state"]["integrations"]["huggingface"]["model"]["config"]["content"]["causal_mask"] = (
        False
    )
    with pytest.raises(ReferenceFormatError, match="lm_head.*causal_mask=False"):
        read_reference(tmp_path / "x.pt", payload=payload)
    # an architecture setting ours cannot represent
    with pytest.raises(ReferenceFormatError, match="mlp_in_bias"):
        reference_model_args(flex_config(False, mlp_in_bias=True))


def test_config_fields_map_to_model_args():
    args = reference_model_args(
        flex_config(True, rotary_emb_base=160000.0, local_attn_rotary_emb_base=10000.0),
        causal=True,
    )
    assert (args.global_rope_theta, args.local_rope_theta) == (160000.0, 10000.0)
    assert args.local_attention == 128 and args.global_attn_every_n_layers == 3 and args.causal
    same = reference_model_args(flex_config(False, rotary_emb_base=160000.0))
    assert same.local_rope_theta == 160000.0  # -1 = the global base
    assert reference_model_args(flex_config(False, norm_kwargs={"eps": 1e-6})).norm_eps == 1e-6


def test_a_run_of_another_size_or_objective_is_refused(tmp_path):
    ref = read_reference(tmp_path / "x.pt", payload=reference_payload(False))
    run = ModelArgs(
        num_layers=L, hidden_size=H, intermediate_size=INTER, num_heads=HEADS, vocab_size=V
    )
    check_fits_run(ref, run, "run r")
    with pytest.raises(ReferenceFormatError, match="num_layers: checkpoint 4, run 7.*another size"):
        check_fits_run(ref, ModelArgs(**{**run.__dict__, "num_layers": 7}), "run r")
    with pytest.raises(ReferenceFormatError, match=r"encoder \(MLM\) checkpoint.*objective=mlm"):
        check_fits_run(ref, ModelArgs(**{**run.__dict__, "causal": True}), "run r")


def test_init_from_and_import_accept_a_reference_checkpoint(tmp_path):
    from ettin.checkpoint import load_checkpoint
    from ettin.cli import main
    from ettin.interop import read_any_checkpoint

    torch.save(reference_payload(True), tmp_path / "ref.pt")
    state, info = read_any_checkpoint(tmp_path / "ref.pt")  # what init_from= reads
    assert info.objective == "clm" and info.model_args.causal
    assert "model.layers.1.attn.Wqkv.weight" in state
    main(["import", str(tmp_path / "ref.pt"), str(tmp_path / "start.pt")])
    model, got = load_checkpoint(tmp_path / "start.pt")
    assert got.lineage["reference"] == str(tmp_path / "ref.pt")
    assert torch.equal(model.state_dict()["head.dense.weight"], state["head.dense.weight"])


FRESH_READERS = """
import sys
from ettin.checkpoint import CheckpointError, read_checkpoint, state_digest

def refused():
    try:
        read_checkpoint(REF)
    except CheckpointError as err:
        return str(err)
    return "read"

print("checkpoint alone:", refused(), "| interop loaded:", "ettin.interop" in sys.modules)
from ettin.model import EttinModel, ModelArgs
from ettin.train import init_from_checkpoint

model = EttinModel(ModelArgs(**ARGS))
info = init_from_checkpoint(model, REF)
print("init_from:", info.objective, state_digest(model.state_dict()))
print("after the formats were imported:", refused())
"""


def test_reading_a_reference_checkpoint_is_a_visible_import(tmp_path):
    """In a fresh interpreter (nothing imported by a test file): `ettin.checkpoint` alone refuses
    a reference checkpoint and names the reader that takes it; `init_from` reads it through the
    import it makes itself; and importing the formats changes nothing in `ettin.checkpoint` (no
    registry filled on import)."""
    import subprocess
    import sys

    from ettin.checkpoint import state_digest

    ref = read_reference(tmp_path / "ref.pt", payload=reference_payload(True))
    torch.save(reference_payload(True), tmp_path / "ref.pt")
    code = f"REF = {str(tmp_path / 'ref.pt')!r}\nARGS = {dataclasses.asdict(ref.model_args)!r}\n"
    out = subprocess.run(
        [sys.executable, "-c", code + FRESH_READERS], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    alone, loaded = lines["checkpoint alone"].rsplit(" | interop loaded: ", 1)
    assert loaded == "False"
    assert (
        "without ettin's RunInfo" in alone and "ettin.interop.formats.read_any_checkpoint" in alone
    )
    assert lines["init_from"] == f"clm {state_digest(ref.state)}"
    assert lines["after the formats were imported"] == alone


@pytest.fixture(scope="module")
def ref_tokenizer():
    """The tiny tokenizer (68 ids, under the mock's vocab of 72) and its Composer metadata."""
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer(num_words=60)
    return tok, composer_tokenizer_state(tok)


@pytest.mark.parametrize("causal", [False, True])
def test_export_of_a_reference_checkpoint_carries_its_tokenizer(
    tmp_path, monkeypatch, ref_tokenizer, causal
):
    """`ettin export REF.pt OUT` writes the tokenizer the checkpoint carries, and config.json
    takes its special ids (the pad id of the model too): `AutoTokenizer.from_pretrained(OUT)`."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from ettin.cli import main

    monkeypatch.setenv("ETTIN_CACHE", str(tmp_path / "cache"))
    tok, files = ref_tokenizer
    torch.save(reference_payload(causal, tokenizer_state=files), tmp_path / "ref.pt")
    main(["export", str(tmp_path / "ref.pt"), str(tmp_path / "out")])
    got = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert got.get_vocab() == tok.get_vocab()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    ids = {
        "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    assert {k: config[k] for k in ids} == ids
    assert AutoConfig.from_pretrained(tmp_path / "out").pad_token_id == tok.pad_token_id == 63
    enc = got("w1 w2")["input_ids"]
    assert enc[0] == tok.cls_token_id  # the objective's template: [CLS] w1 w2 [SEP] | [CLS] w1 w2
    assert enc[-1] == (tok.convert_tokens_to_ids("w2") if causal else tok.sep_token_id)
    # the checkpoint is read the same way by init_from= (its folder and fingerprint)
    from ettin.interop import read_any_checkpoint

    _, info = read_any_checkpoint(tmp_path / "ref.pt")
    assert info.tokenizer["mask_token_id"] == tok.mask_token_id
    assert info.model_args.pad_token_id == tok.pad_token_id
    assert Path(info.tokenizer["path"]).parent == tmp_path / "cache" / "tokenizers"


def test_every_layer_local_reference_config_is_refused_by_name():
    """FlexBert makes every layer local when global_attn_every_n_layers <= 0 and a window is set;
    ours cannot (layer 0 is always global, as in HF's ModernBERT): refused, never imported as
    every layer global. Without a window every layer is global, which is imported."""
    for every_n in (0, -1):
        with pytest.raises(ReferenceFormatError, match=r"every\s+layer local \(window 128\)"):
            reference_model_args(flex_config(False, global_attn_every_n_layers=every_n))
    with pytest.raises(ReferenceFormatError, match="needs a sliding_window"):
        reference_model_args(flex_config(False, sliding_window=-1))
    every = reference_model_args(
        flex_config(True, sliding_window=-1, global_attn_every_n_layers=-1)
    )
    assert all(every.is_global(i) for i in range(every.num_layers))


def _to_reference(ours: dict, causal: bool) -> dict:
    """Our Composer checkpoint rewritten in the reference's layout (the inverse mapping)."""

    def flex(name: str) -> str:  # ours within the ComposerModel: model.<ettin name>
        n = name[len("model.") :]
        if n.startswith("model.layers."):
            return "model.bert.encoder.layers." + n[len("model.layers.") :]
        if n.startswith("model."):
            return "model.bert." + n[len("model.") :]
        if n.startswith("head.") and causal:
            return "model.lm_head." + n[len("head.") :]
        return "model." + n

    st = ours["state"]
    opt = st["optimizers"]["StableAdamW"]
    args = st["callbacks"]["RunInfo"]["model_args"]
    config = flex_config(causal)
    config.update(
        num_hidden_layers=args["num_layers"],
        hidden_size=args["hidden_size"],
        intermediate_size=args["intermediate_size"],
        num_attention_heads=args["num_heads"],
        vocab_size=args["vocab_size"],
        sliding_window=args["local_attention"],
    )
    return {
        "state": {
            "model": {flex(k): v for k, v in st["model"].items()},
            "optimizers": {
                "StableAdamW": {
                    "state": {flex(k): v for k, v in opt["state"].items()},
                    "param_groups": [
                        {**g, "params": [flex(p) for p in g["params"]]} for g in opt["param_groups"]
                    ],
                }
            },
            "timestamp": st["timestamp"],
            "run_name": "reference",
            "integrations": {"huggingface": {"model": {"config": {"content": config}}}},
        },
        "rng": ours["rng"],
    }


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_resume_into_continues_the_reference_run_exactly(world, tmp_path, objective):
    """A run checkpointed at batch 3, rewritten in the reference layout and imported with
    --resume-into, then trained to batch 5: losses of steps 4-5 equal the uninterrupted run's."""
    from ettin.cli import main
    from ettin.train import train

    common = (
        "max_duration=5ba",
        "save_interval=3ba",
        "callbacks.export_hf=false",
        "model.local_attention=16",  # the 48-token samples exceed the window: the rule matters
    )
    # the reference trains decoders with its own window (65 keys for 128, here 9 for 16)
    window = ("model.causal_window=reference",) if objective == "clm" else ()
    straight = tiny_config(world, f"ref-straight-{objective}", objective, *common, *window)
    train(straight)
    ours = torch.load(Path(straight.run_dir) / "checkpoints/ep0-ba3-rank0.pt", weights_only=False)
    torch.save(_to_reference(ours, objective == "clm"), tmp_path / "ref.pt")
    resumed = tiny_config(world, f"ref-resumed-{objective}", objective, *common)
    main(
        [
            "import",
            str(tmp_path / "ref.pt"),
            "--resume-into",
            resumed.run_dir,
            "--config",
            str(TINY_RUN),
            "--set",
            *tiny_overrides(world, resumed.run_name, *common, objective=objective),
        ]
    )
    latest = Path(resumed.run_dir) / "checkpoints/latest-rank0.pt"
    assert latest.resolve().name == "ep0-ba3-rank0.pt"
    if objective == "clm":  # resuming with HF's window would change every local layer
        from ettin.config import ConfigError

        with pytest.raises(ConfigError, match="trained with model.causal_window=reference"):
            train(resumed)
        resumed = tiny_config(world, f"ref-resumed-{objective}", objective, *common, *window)
    train(resumed)
    a, b = losses(Path(straight.run_dir)), losses(Path(resumed.run_dir))
    assert sorted(b) == [3, 4] and all(a[k] == b[k] for k in b), (a, b)
    imported = torch.load(latest.parent / "ep0-ba3-rank0.pt", weights_only=False)["state"]
    assert imported["callbacks"]["RunInfo"]["lineage"]["resumed_from_reference"] == str(
        tmp_path / "ref.pt"
    )
    meta = torch.load(latest.parent / "ep0-ba5-rank0.pt", weights_only=False)["state"]
    end = torch.load(Path(straight.run_dir) / "checkpoints/ep0-ba5-rank0.pt", weights_only=False)
    assert (
        meta["timestamp"]["Timestamp"]["token"] == end["state"]["timestamp"]["Timestamp"]["token"]
    )


def flexbert_logits(flex: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """The reference decoder's forward (FlexBert prenorm, GLU, RoPE), written from its config and
    tensors in float64 with a dense mask: global layers causal, local layers the reference's
    flash window (w/2, w/2) + causal, i.e. keys i - w/2 ... i. One unpadded sequence (S,)."""
    f = {k: v.double() for k, v in flex.items()}
    d = config["hidden_size"] // config["num_attention_heads"]
    heads, half = config["num_attention_heads"], config["sliding_window"] // 2
    S = ids.shape[0]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    causal = j <= i
    local = causal & (i - j <= half)

    def ln(x, w):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, None, 1e-5)

    def rope(x, theta):  # (heads, S, d), rotate_half over the full head_dim
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = ln(
        f["model.bert.embeddings.tok_embeddings.weight"][ids],
        f["model.bert.embeddings.norm.weight"],
    )
    for n in range(config["num_hidden_layers"]):
        p = f"model.bert.encoder.layers.{n}."
        is_global = n % config["global_attn_every_n_layers"] == 0
        h = x if n == 0 else ln(x, f[p + "attn_norm.weight"])
        q, k, v = (h @ f[p + "attn.Wqkv.weight"].T).view(S, 3, heads, d).permute(1, 2, 0, 3)
        theta = config["rotary_emb_base"]
        q, k = rope(q, theta), rope(k, theta)
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(~(causal if is_global else local), float("-inf"))
        attn = (scores.softmax(-1) @ v).permute(1, 0, 2).reshape(S, -1)
        x = x + attn @ f[p + "attn.Wo.weight"].T
        a, g = (ln(x, f[p + "mlp_norm.weight"]) @ f[p + "mlp.Wi.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.gelu(a) * g) @ f[p + "mlp.Wo.weight"].T
    h = ln(x, f["model.bert.final_norm.weight"])
    h = ln(
        torch.nn.functional.gelu(h @ f["model.lm_head.dense.weight"].T),
        f["model.lm_head.norm.weight"],
    )
    return h @ f["model.decoder.weight"].T + f["model.decoder.bias"]


@pytest.mark.parametrize("attn_impl", ["torch", "flex"])
def test_reference_decoder_imports_with_the_reference_window(tmp_path, attn_impl):
    """`ettin import` of a reference-layout decoder computes the reference's logits (65 keys per
    local query for sliding_window 128) to <= 1e-5 at every position, the ones >= 64 included,
    where HF's 64-key window differs."""
    from ettin.checkpoint import load_checkpoint
    from ettin.cli import main

    payload = reference_payload(True, seed=3)
    for name, t in payload["state"]["model"].items():  # moderate logits: an absolute 1e-5 bites
        if not name.endswith("norm.weight"):
            t.mul_(0.5)
    torch.save(payload, tmp_path / "ref.pt")
    main(["import", str(tmp_path / "ref.pt"), str(tmp_path / "start.pt")])
    model, info = load_checkpoint(tmp_path / "start.pt")
    assert info.model_args.causal_window == "reference" and model.args.local_window == (64, 0)
    model.eval().attn_impl = attn_impl
    S = 150
    ids = torch.randint(1, V, (S,), generator=torch.Generator().manual_seed(2))
    config = payload["state"]["integrations"]["huggingface"]["model"]["config"]["content"]
    want = flexbert_logits(payload["state"]["model"], config, ids)
    with torch.no_grad():
        got = model.padded_logits(ids[None], torch.ones(1, S, dtype=torch.long))[0].double()
        hf_rule = EttinModel(dataclasses.replace(model.args, causal_window="hf"))
        hf_rule.load_state_dict(model.state_dict())
        other = hf_rule.eval().padded_logits(ids[None], torch.ones(1, S, dtype=torch.long))[0]
    err = (got - want).abs().max(-1).values
    print(f"max |ours - reference| {err.max():.2e} (logit scale {want.abs().max():.2f})")
    assert want.abs().max() > 1.0 and err.max() <= 1e-5
    assert (other.double()[:64] - want[:64]).abs().max() <= 1e-5  # the windows agree before 64
    assert (other.double()[64:] - want[64:]).abs().max() > 1e-3  # and not after


def test_bert24_optimizer_state_maps_into_optimi_and_says_what_is_dropped(tmp_path):
    """bert24's StableAdamW keeps exp_avg, exp_avg_sq, eps_sq and kahan_comp per parameter and
    the step per group: the moments and step land in torch-optimi's state; a Kahan buffer is
    folded into the fp32 weight; eps_sq comes from our eps and differences are warned."""
    from ettin.config import OptimConfig
    from ettin.interop.reference import load_optimizer_state
    from ettin.optim import build_optimizer

    payload = reference_payload(False, step=9)
    model_state = payload["state"]["model"]
    opt = payload["state"]["optimizers"]["StableAdamW"]
    wi = "model.bert.encoder.layers.2.mlp.Wi.weight"
    comp = 1e-3 * torch.randn(model_state[wi].shape, generator=torch.Generator().manual_seed(5))
    for key, entry in opt["state"].items():
        entry["eps_sq"] = torch.tensor(1e-12)
        entry["kahan_comp"] = comp if key == wi else None
    opt["state"][wi]["eps_sq"] = torch.tensor(1e-10)  # as if trained with eps 1e-5
    for g in opt["param_groups"]:
        g.update(beta1=0.9, beta2=0.95, eps=1e-6, decouple_lr=True)
    ref = read_reference(tmp_path / "x.pt", payload=payload)
    assert ref.optimizer_notes == ["kahan_comp"]
    assert torch.equal(ref.state["model.layers.2.mlp.Wi.weight"], model_state[wi] + comp)
    model = EttinModel(ref.model_args)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=1e-5))
    with pytest.warns(UserWarning) as caught:
        step = load_optimizer_state(optimizer, model, ref)
    said = str(caught[0].message)
    assert "kahan_comp (folded" in said and "beta2 0.95 (ours 0.98" in said
    assert "model.layers.2.mlp.Wi.weight eps_sq 1e-10 (ours 1e-12)" in said
    assert "beta1" not in said  # what agrees is not reported
    assert step == 9
    params = dict(model.named_parameters())
    state = optimizer.state[params["model.layers.2.mlp.Wi.weight"]]
    assert torch.equal(state["exp_avg"], opt["state"][wi]["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], opt["state"][wi]["exp_avg_sq"])
    assert state["kahan_comp"] is None and float(state["eps_sq"]) == pytest.approx(1e-12)
    assert all(int(g["step"]) == 9 for g in optimizer.param_groups)


def test_checkpoint_room_knows_no_format_and_no_trainer():
    """`ettin.checkpoint` imports neither `ettin.interop` nor `ettin.train` (module or function
    level), and the formats never import the training layer; only `ettin.resume` joins them."""
    import ast
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src/ettin"

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert not {
        m for m in imported(src / "checkpoint.py") if m.startswith(("ettin.interop", "ettin.train"))
    }
    for path in (src / "interop").glob("*.py"):
        assert not {m for m in imported(path) if m.startswith(("ettin.train", "ettin.resume"))}
    code = "import sys, ettin.checkpoint; print(sorted(m for m in sys.modules if m.startswith('ettin')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ettin.interop" not in out.stdout and "ettin.train" not in out.stdout, out.stdout
