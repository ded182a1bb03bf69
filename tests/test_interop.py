"""Hugging Face conversion: fp32 parity with ModernBertForMaskedLM / ModernBertDecoderForCausalLM."""

import json
import logging
import warnings

import pytest
import torch
from helpers import word_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    ModernBertConfig,
    ModernBertDecoderConfig,
    ModernBertDecoderForCausalLM,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
)

from ettin.interop import (
    check_tokenizer,
    export_hf,
    from_hf_state_dict,
    import_hf,
    to_hf_state_dict,
)
from ettin.model import EttinModel, model_args

VOCAB = 256
LOCAL = 16  # small window so that sequences below exceed it
LENGTHS = [40, 25, 9, 33]


def tiny_model(causal: bool, **overrides) -> EttinModel:
    """4 layers (0 and 3 global), weights spread so attention is peaky and every norm matters."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=VOCAB,
        local_attention=LOCAL,
        pad_token_id=0,
        causal=causal,
        global_rope_theta=160000.0,
        local_rope_theta=160000.0 if causal else 10000.0,  # encoders exercise per-layer theta
    )
    model = EttinModel(model_args("test", **{**settings, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    S = max(LENGTHS)
    mask = (torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return torch.randint(1, VOCAB, (len(LENGTHS), S), generator=g) * mask, mask


def bert_tokenizer(num_words: int = 20) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer with BERT-style special tokens first ([PAD] = 0), no template."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(num_words)]
    return word_tokenizer(words, specials, specials_first=True, template=False)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[bool, tuple[EttinModel, object]]:
    """causal -> (model, export directory), exported once per module with a tokenizer."""
    out = {}
    for causal in (False, True):
        model = tiny_model(causal)
        out[causal] = (
            model,
            export_hf(model, tmp_path_factory.mktemp("hf"), tokenizer=bert_tokenizer()),
        )
    return out


def load_hf(path, causal: bool, attn: str = "sdpa"):
    """Load an export with transformers' Auto classes; returns (model, loading info, warnings)."""
    handler = Records()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if causal:
                hf, info = AutoModelForCausalLM.from_pretrained(
                    path, attn_implementation=attn, output_loading_info=True
                )
            else:
                hf, info = AutoModelForMaskedLM.from_pretrained(
                    path,
                    attn_implementation=attn,
                    reference_compile=False,
                    output_loading_info=True,
                )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    messages = [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
    return hf.eval(), info, messages


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp32_parity_with_hf(exports, causal, attn):
    model, path = exports[causal]
    hf, _, _ = load_hf(path, causal, attn)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model.padded_logits(ids, mask)
        theirs = hf(
            input_ids=ids, attention_mask=mask, **({"use_cache": False} if causal else {})
        ).logits
    real = mask.bool()
    diff = (ours - theirs)[real].abs().max().item()
    print(
        f"{'decoder' if causal else 'encoder'} {attn}: max |diff| = {diff:.3g} (logit scale {ours[real].abs().max():.3g})"
    )
    assert ours[real].abs().max() > 1.0  # the comparison is not between near-zero logits
    assert diff <= 1e-4


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_export_loads_cleanly_and_keeps_config(exports, causal):
    model, path = exports[causal]
    hf, info, messages = load_hf(path, causal)
    assert (
        info["missing_keys"] == []
        and info["unexpected_keys"] == []
        and info["mismatched_keys"] == []
    )
    assert messages == []
    expected_cls = ModernBertDecoderForCausalLM if causal else ModernBertForMaskedLM
    assert type(hf) is expected_cls
    assert hf.decoder.weight is hf.model.embeddings.tok_embeddings.weight
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == ("modernbert-decoder" if causal else "modernbert")
    assert config["local_attention"] == LOCAL and config["hidden_size"] == 64
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (0, 2, 3)
    assert (config["bos_token_id"], config["eos_token_id"]) == (2, 3)
    if causal:
        assert config["layer_types"] == [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ]
        assert hf.config.sliding_window == LOCAL // 2  # the reload bug is defused
    else:
        assert (config["global_rope_theta"], config["local_rope_theta"]) == (160000.0, 10000.0)
    assert AutoTokenizer.from_pretrained(path).pad_token_id == 0


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_export_import_round_trip_is_exact(exports, causal):
    model, path = exports[causal]
    imported, tokenizer = import_hf(path, local_files_only=True)
    assert imported.args == model.args
    ours, theirs = model.state_dict(), imported.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert imported.decoder.weight is imported.model.embeddings.tok_embeddings.weight
    assert tokenizer is not None and tokenizer.mask_token_id == 4


def greedy_both(model, hf, prompt, steps: int = 20):
    """Greedy continuations of `prompt`: transformers' `generate` on the export, and our loop."""
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        ours = prompt
        for _ in range(steps):
            next_id = model.padded_logits(ours, torch.ones_like(ours))[0, -1].argmax()
            ours = torch.cat([ours, next_id.view(1, 1)], dim=1)
    return theirs, ours


def test_decoder_greedy_generate_matches_our_loop(exports):
    model, path = exports[True]
    hf, _, _ = load_hf(path, causal=True)
    theirs, ids = greedy_both(model, hf, padded_batch()[0][:1, :10])  # 30 tokens: past the window
    assert theirs.shape == (1, 30)
    assert theirs.tolist() == ids.tolist()


def test_decoder_import_derives_window_when_local_attention_missing(tmp_path):
    model = tiny_model(causal=True)
    export_hf(model, tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    del config["local_attention"]  # what HF's own save_pretrained writes
    config_path.write_text(json.dumps(config))
    imported, tokenizer = import_hf(tmp_path, local_files_only=True)
    assert imported.args.local_attention == LOCAL and tokenizer is None


def test_decoder_state_dict_splits_qkv_and_renames_head():
    model = tiny_model(causal=True)
    hf_state = to_hf_state_dict(model)
    wqkv = model.model.layers[1].attn.Wqkv.weight
    q, k, v = (hf_state[f"model.layers.1.attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), wqkv)
    assert "lm_head.dense.weight" in hf_state and not any(k.startswith("head.") for k in hf_state)
    assert not any("Wqkv" in k for k in hf_state)


def test_state_dict_from_another_size_names_the_first_mismatch():
    small = tiny_model(causal=False)
    other = model_args("test", vocab_size=VOCAB, hidden_size=128, num_heads=2)
    with pytest.raises(ValueError) as err:
        from_hf_state_dict(to_hf_state_dict(small), other)
    message = str(err.value)
    assert "model.embeddings.tok_embeddings.weight" in message
    assert "expected shape (256, 128), found (256, 64)" in message


def test_state_dict_with_extra_tensors_is_refused():
    model = tiny_model(causal=False)
    state = {**to_hf_state_dict(model), "model.layers.0.attn_norm.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.attn_norm.weight'\]"):
        from_hf_state_dict(state, model.args)


def test_decoder_export_refuses_local_theta_mismatch(tmp_path):
    model = tiny_model(causal=True, local_rope_theta=10000.0)
    with pytest.raises(
        ValueError, match=r"local_rope_theta=10000.0 but global_rope_theta=160000.0"
    ):
        export_hf(model, tmp_path / "refused")
    with pytest.warns(UserWarning, match="applies the global theta"):
        export_hf(model, tmp_path / "forced", allow_rope_mismatch=True)
    assert (
        json.loads((tmp_path / "forced" / "config.json").read_text())["local_rope_theta"] == 10000.0
    )


def test_check_tokenizer_refuses_mismatches():
    tokenizer = bert_tokenizer()  # 25 tokens, [PAD] = 0
    check_tokenizer(tokenizer, model_args("test", vocab_size=32, pad_token_id=0))
    with pytest.raises(
        ValueError, match="tokenizer has 25 tokens but the model's vocab_size is 16"
    ):
        check_tokenizer(tokenizer, model_args("test", vocab_size=16, pad_token_id=0))
    with pytest.raises(
        ValueError, match="tokenizer pad id 0 differs from the model's pad_token_id 7"
    ):
        check_tokenizer(tokenizer, model_args("test", vocab_size=32, pad_token_id=7))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_window_rules(attn):
    """The evidence for our window choice: which keys a local-layer query sees in HF 4.57.6."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        local_attention=8,
    )
    decoder = ModernBertDecoderForCausalLM(
        ModernBertDecoderConfig(
            **common, num_hidden_layers=1, layer_types=["sliding_attention"], pad_token_id=0
        )
    )
    encoder = ModernBertForMaskedLM(
        ModernBertConfig(
            **common,
            num_hidden_layers=2,
            global_attn_every_n_layers=2,
            pad_token_id=0,
            reference_compile=False,
        )
    )
    encoder.model.layers = encoder.model.layers[1:]  # keep only the local layer
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    query = 8

    def keys_seen(model, **kw):
        model.eval().config._attn_implementation = attn
        with torch.no_grad():
            base = model(ids, **kw).logits[0, query]
            seen = []
            for j in range(16):
                changed = ids.clone()
                changed[0, j] = (changed[0, j] + 7) % 61 + 3
                if (model(changed, **kw).logits[0, query] - base).abs().max() > 1e-6:
                    seen.append(j)
        return seen

    assert keys_seen(encoder) == list(range(query - 4, query + 5))  # |i - j| <= 8 // 2: 9 keys
    assert keys_seen(decoder, use_cache=False) == list(
        range(query - 3, query + 1)
    )  # 4 keys incl. self


# ---------------------------------------------------------------- exports right for their objective


def test_export_tokenizer_fits_the_objective(exports):
    """Decoder: BOS first, no EOS, bos/eos named. Encoder: [CLS] ... [SEP], bos/eos named too."""
    for causal in (False, True):
        tok = AutoTokenizer.from_pretrained(exports[causal][1])
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        assert (tok.bos_token_id, tok.eos_token_id) == (cls_id, sep_id)
        ids = tok("w1 w2")["input_ids"]
        if causal:
            assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id and len(ids) == 3
        else:
            assert ids[0] == cls_id and ids[-1] == sep_id and len(ids) == 4


def test_text_generation_pipeline_prompt_does_not_end_with_eos(exports):
    from transformers import pipeline

    path = exports[True][1]
    pipe = pipeline("text-generation", model=str(path), device="cpu")
    ids = pipe.preprocess("w1 w2 w3")["input_ids"][0].tolist()
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] != pipe.tokenizer.eos_token_id
    out = pipe("w1 w2 w3", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("w1 w2 w3")


def test_import_restores_the_training_template(exports):
    _, tokenizer = import_hf(exports[True][1], local_files_only=True)
    ids = tokenizer("w1 w2")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_export_records_the_trained_length(tmp_path):
    export_hf(tiny_model(causal=True), tmp_path, tokenizer=bert_tokenizer(), max_seq_len=96)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 96
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 96


def test_foreign_model_keeps_its_config_through_import_and_export(tmp_path):
    """`ettin import` -> `ettin export` of a ModernBERT model ettin never trained."""
    from ettin.cli import main

    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        classifier_pooling="mean",
        max_position_embeddings=1024,
        classifier_dropout=0.1,
        pad_token_id=0,
        bos_token_id=2,
        cls_token_id=2,
        eos_token_id=3,
        sep_token_id=3,
    )
    ModernBertForMaskedLM(config).save_pretrained(tmp_path / "foreign")
    bert_tokenizer().save_pretrained(tmp_path / "foreign")
    main(["import", str(tmp_path / "foreign"), str(tmp_path / "start.pt")])
    main(["export", str(tmp_path / "start.pt"), str(tmp_path / "back")])
    before = json.loads((tmp_path / "foreign" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    assert after["classifier_pooling"] == "mean" and after["max_position_embeddings"] == 1024
    changed = {k for k in before if k != "transformers_version" and before[k] != after.get(k)}
    assert changed == set(), {k: (before[k], after.get(k)) for k in changed}
    assert AutoTokenizer.from_pretrained(tmp_path / "back").model_max_length == 1024
    original = ModernBertForMaskedLM.from_pretrained(tmp_path / "foreign").state_dict()
    exported = ModernBertForMaskedLM.from_pretrained(tmp_path / "back").state_dict()
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_reference_window_decoder_exports_exactly(tmp_path, attn):
    """A decoder with the reference's causal window (self + local_attention//2 previous keys)
    exports as HF local_attention + 2, which HF's decoder runs as exactly that window; the
    logits match ours, also in greedy generation with HF's sliding cache, and import restores
    the rule. The same weights with HF's window differ past the window (the test can fail)."""
    model = tiny_model(causal=True, causal_window="reference")
    path = export_hf(model, tmp_path / "ref")
    saved = json.loads((path / "config.json").read_text())
    assert saved["local_attention"] == LOCAL + 2 and saved["ettin_causal_window"] == "reference"
    hf, _, _ = load_hf(path, causal=True, attn=attn)
    assert hf.config.sliding_window == LOCAL // 2 + 1
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model.padded_logits(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        other = tiny_model(causal=True).padded_logits(ids, mask)  # same weights, HF's window
    assert (ours - theirs)[real].abs().max().item() <= 1e-4
    assert (ours - other)[real].abs().max().item() > 1e-3
    generated, loop = greedy_both(model, hf, ids[:1, :10])
    assert generated.tolist() == loop.tolist()
    back, _ = import_hf(path, local_files_only=True)
    assert (back.args.local_attention, back.args.causal_window) == (LOCAL, "reference")
    assert back.args.local_window == model.args.local_window == (LOCAL // 2, 0)
