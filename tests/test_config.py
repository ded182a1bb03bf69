"""The run configuration: composition, overrides, validation, and the 48 suite files."""

from pathlib import Path

import pytest
import torch

from ettin.config import ConfigError, load_config, to_yaml
from ettin.recipe import format_plan, plan
from ettin.suite import TABLE_END, TABLE_START, generated_files, run_files, suite_table

ROOT = Path(__file__).resolve().parents[1]


def test_suite_has_48_run_files():
    files = run_files()
    assert len([f for f in files if f.parent.name != "cross"]) == 36
    assert len([f for f in files if f.parent.name == "cross"]) == 12


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from ettin.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("path", run_files(), ids=lambda p: p.stem)
def test_every_run_file_builds_its_model_through_the_real_builder(path, tokenizer):
    """Each run file composes, and theta, window, dropout and the objective's mask reach the
    model the trainer would build (`ettin.train.build_model`, on `meta`: no memory)."""
    from ettin.model import model_args, parameter_count
    from ettin.train import build_model

    cfg = load_config(path)
    assert cfg.run_name == path.stem
    assert cfg.global_train_batch_size == 4608
    with torch.device("meta"):
        model = build_model(cfg, tokenizer)
    a = model.args
    assert a.causal == (cfg.objective.name == "clm")
    assert (a.global_rope_theta, a.local_rope_theta) == (
        cfg.model.global_rope_theta,
        cfg.model.local_rope_theta,
    )
    assert a.local_attention == cfg.model.local_attention == 128
    assert a.attn_out_dropout == cfg.model.attn_out_dropout == 0.1
    assert a.pad_token_id == tokenizer.pad_token_id and a.vocab_size == 50368
    assert model.model.layers[1].attn.rope_theta == cfg.model.local_rope_theta  # layer 1 is local
    assert (
        sum(p.numel() for p in model.parameters())
        == parameter_count(model_args(cfg.model.size))["total"]
    )


@pytest.mark.parametrize(
    ("run", "lr", "micro", "tokens", "seq", "theta"),
    [
        ("encoder-150m", 8e-4, 72, "1_700_000_000_000tok", 1024, 10000.0),
        ("decoder-150m-extension", 8e-4, 16, "250_000_000_000tok", 8000, 160000.0),
        ("encoder-400m-decay", 2.5e-4, 2, "50_000_000_000tok", 8000, 160000.0),
        ("decoder-1b-decay", 2.5e-4, 2, "16_666_666_667tok", 8000, 160000.0),
        ("cross/encoder-from-decoder-68m", 1.5e-3, 8, "50_000_000_000tok", 8000, 160000.0),
    ],
)
def test_reference_numbers(run, lr, micro, tokens, seq, theta):
    cfg = load_config(ROOT / "yamls" / f"{run}.yaml")
    assert cfg.optim.peak_lr == pytest.approx(lr)
    assert cfg.device_train_microbatch_size == micro
    assert cfg.max_duration == tokens
    assert cfg.data.max_seq_len == seq
    assert cfg.model.global_rope_theta == cfg.model.local_rope_theta == theta


def test_phase_specific_settings():
    dec = load_config(ROOT / "yamls/encoder-17m-decay.yaml")
    assert dec.objective.mlm_probability == 0.15
    assert (dec.scheduler.alpha_f, dec.scheduler.decay_shape, dec.scheduler.t_decay) == (
        0.04,
        "1-sqrt",
        "1dur",
    )
    assert dec.init_from == "runs/encoder-17m-extension/checkpoints/latest-rank0.pt"
    cross = load_config(ROOT / "yamls/cross/decoder-from-encoder-150m.yaml")
    assert (cross.seed, cross.objective.name) == (210, "clm")
    assert cross.init_from == "runs/encoder-150m-decay/checkpoints/latest-rank0.pt"
    assert (cross.scheduler.t_warmup, cross.scheduler.t_decay) == (
        "3_000_000_000tok",
        "10_000_000_000tok",
    )


def test_objective_swap_is_one_override():
    cfg = load_config(ROOT / "yamls/encoder-32m.yaml", ["objective=clm"])
    assert cfg.objective.name == "clm"
    assert cfg.model.size == "32m"


def test_key_overrides_and_interpolation():
    cfg = load_config(
        ROOT / "yamls/tiny/encoder.yaml", ["optim.lr=1e-3", "data_root=/x", "run_name=abc"]
    )
    assert cfg.optim.lr == 1e-3
    assert cfg.data.path == "/x/pretrain"
    assert cfg.run_dir == "runs/abc"
    assert "run_name: abc" in to_yaml(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("run_nam=x", "did you mean 'run_name'"),
        ("modle.size=1b", "did you mean 'model'"),
        ("scheduler.decay_shape=cosine", "not one of linear, 1-sqrt"),
        ("objective.name=mlmm", "did you mean 'mlm'"),
        ("optim.lr=fast", "could not be converted"),
        ("objective=nope", "Could not find 'objective/nope'"),
        ("objective.mlm_probability=1.5", "must be in (0, 1)"),
        ("optim.lr", "is not key=value"),
        ("+compile_config={}", "set compile=true instead"),
    ],
)
def test_bad_overrides_name_the_problem(override, expected):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(ROOT / "yamls/encoder-17m.yaml", [override])
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.size=17M"], "model.size='17M' is not one of 17m, 32m"),
        (["model.num_heads=3"], "model.hidden_size (256) must be a multiple of num_heads (3)"),
        (["model.local_attention=127"], "model.local_attention (127) must be even"),
        (["optim.betas=[0.9]"], "optim.betas must have two values"),
        (["max_duration=1dur"], "max_duration='1dur': use tok, ba, sp, ep, not dur"),
        (["max_duration=20"], "max_duration='20' is not a Composer time string"),
        (["save_interval=often"], "save_interval='often' is not a Composer time string"),
        (["scheduler.t_decay=100ba"], "scheduler.t_decay=100ba is in ba but max_duration"),
        (
            ["data.batch_size_warmup_tokens=5ba"],
            "data.batch_size_warmup_tokens='5ba': use tok, not ba",
        ),
        (["data.max_seq_len=2"], "data.max_seq_len=2 is too short for objective=mlm"),
        (["callbacks.speed_window=0"], "callbacks.speed_window must be >= 1"),
    ],
)
def test_values_that_failed_during_the_run_are_refused_when_the_config_is_read(overrides, expected):
    """These surfaced only once the model, the optimiser or the schedule was built (or as a
    traceback, now that only user errors are one line): the config names them first."""
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "yamls/encoder-17m.yaml", overrides)
    assert expected in str(err.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    tree = tmp_path / "yamls"
    tree.mkdir()
    (tree / "base.yaml").write_text("run_name: x\ndata: {path: d}\n")
    (tree / "run.yaml").write_text("defaults:\n  - base\n  - _self_\noptim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        load_config(tree / "run.yaml")


def test_whole_model_compile_cannot_be_one_graph():
    """Why `compile_config` is refused: the unpadding's token count is data-dependent."""
    from ettin.model import EttinModel
    from ettin.model.sizes import model_args

    torch._dynamo.reset()
    model = torch.compile(EttinModel(model_args("demo")), backend="eager", fullgraph=True)
    ids = torch.randint(5, 1000, (2, 16))
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(ids, torch.ones_like(ids), ids)
    torch._dynamo.reset()


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("yamls/nope.yaml")


def test_suite_files_are_generated_from_the_table():
    """Run files, recipes and the docs table are `ettin.suite`'s output, byte for byte."""
    files = generated_files(ROOT)
    assert len(files) == 48 + 6
    stale = [str(p.relative_to(ROOT)) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"run `python -m ettin.suite` to regenerate: {stale}"
    on_disk = {p for p in run_files()}
    assert on_disk == {p for p in files if p.parent.parent.name != "recipes" and "yamls" in p.parts}
    text = (ROOT / "docs/recipe.md").read_text()
    table = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert table == suite_table().strip(), "run `python -m ettin.suite` to refresh docs/recipe.md"


def test_suite_lineage_and_phase_numbers():
    """The decay and cross runs train at half the size's peak LR; each phase starts from its
    predecessor's weights; nothing is said twice (the run files carry no LR of their own)."""
    decay = load_config(ROOT / "yamls/encoder-150m-decay.yaml")
    cross = load_config(ROOT / "yamls/cross/decoder-from-encoder-150m.yaml")
    first = load_config(ROOT / "yamls/encoder-150m.yaml")
    assert first.optim.peak_lr == 8e-4 and decay.optim.peak_lr == cross.optim.peak_lr == 4e-4
    assert decay.init_from == "runs/encoder-150m-extension/checkpoints/latest-rank0.pt"
    assert cross.init_from == "runs/encoder-150m-decay/checkpoints/latest-rank0.pt"
    assert "lr" not in (ROOT / "yamls/encoder-150m-decay.yaml").read_text()
    from ettin.optim import build_optimizer

    groups = build_optimizer(torch.nn.Linear(2, 2), decay.optim).param_groups
    assert {(g["lr"], g["max_lr"]) for g in groups} == {(4e-4, 4e-4)}  # the optimiser uses it


def test_recipe_plan_chains_stages(tmp_path):
    stages = plan(ROOT / "recipes/ettin-68m.yaml", runs_root=str(tmp_path))
    names = [s.cfg.run_name for s in stages]
    assert names[:3] == ["encoder-68m", "encoder-68m-extension", "encoder-68m-decay"]
    assert stages[1].cfg.init_from == str(tmp_path / "encoder-68m/checkpoints/latest-rank0.pt")
    assert stages[6].cfg.init_from == str(
        tmp_path / "decoder-68m-decay/checkpoints/latest-rank0.pt"
    )
    assert all(s.status == "pending" for s in stages)
    (tmp_path / "encoder-68m").mkdir()
    (tmp_path / "encoder-68m/DONE").write_text("1")
    stages = plan(ROOT / "recipes/ettin-68m.yaml", runs_root=str(tmp_path))
    assert stages[0].status == "done"
    text = format_plan("ettin-68m", stages)
    assert "encoder-from-decoder-68m" in text and ">= 360,276" in text


def test_recipe_rejects_a_stage_before_its_source(tmp_path):
    bad = tmp_path / "recipes" / "r.yaml"
    bad.parent.mkdir()
    bad.write_text(
        f"name: r\nstages:\n  - {ROOT}/yamls/encoder-17m-extension.yaml\n"
        f"  - {ROOT}/yamls/encoder-17m.yaml\n"
    )
    with pytest.raises(ConfigError, match="starts from encoder-17m .* list it earlier"):
        plan(bad)
