"""Checkpoints as revisions (save_step0, export --all, publish, REPO@REV) and the loss-spike guard."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import losses, tiny_config


def test_step0_checkpoint_export_all_and_resume_from_step0(world, tmp_path):
    from transformers import AutoModelForMaskedLM

    from ettin.checkpoint import read_checkpoint, run_checkpoints, state_digest
    from ettin.cli import main
    from ettin.train import train

    extra = (
        "max_duration=2ba",
        "save_interval=1ba",
        "scheduler.t_warmup=0ba",
        "callbacks.export_hf=false",
    )
    cfg = tiny_config(world, "step0", "mlm", "save_step0=true", *extra)
    train(cfg)
    folder = Path(cfg.run_dir) / "checkpoints"
    assert [p.name for p in run_checkpoints(folder)] == [f"ep0-ba{b}-rank0.pt" for b in (0, 1, 2)]
    w0, _ = read_checkpoint(folder / "ep0-ba0-rank0.pt")
    w1, _ = read_checkpoint(folder / "ep0-ba1-rank0.pt")
    w2, _ = read_checkpoint(folder / "ep0-ba2-rank0.pt")
    assert len({state_digest(w) for w in (w0, w1, w2)}) == 3

    out = tmp_path / "revs"
    main(["export", "--all", cfg.run_dir, str(out)])
    index = json.loads((out / "revisions.json").read_text())["revisions"]
    assert list(index) == ["step0", "step1", "step2"]
    assert index["step1"]["phase"] == "pretrain" and index["step1"]["batch"] == 1
    assert index["step0"]["tokens"] == 0 and index["step2"]["tokens"] > index["step1"]["tokens"] > 0
    assert index["step1"]["sha256"] == state_digest(w1)
    hf = AutoModelForMaskedLM.from_pretrained(out / "step0")
    assert torch.equal(hf.state_dict()["head.dense.weight"], w0["head.dense.weight"])

    # A step-0 checkpoint is a complete checkpoint: resuming from it reproduces the run.
    for p in run_checkpoints(folder)[1:]:
        p.unlink()
    (Path(cfg.run_dir) / "DONE").unlink()
    before = losses(Path(cfg.run_dir))
    train(tiny_config(world, "step0", "mlm", "save_step0=true", *extra))
    assert losses(Path(cfg.run_dir)) == before


def test_phase_and_model_of_a_run(tmp_path):
    from ettin.interop.revisions import PREFIX, model_name, run_phase

    for name, path, phase in [
        ("encoder-17m", "data/pretrain", "pretrain"),
        ("encoder-17m-extension", "data/extension", "extension"),
        ("decoder-17m-decay", "d/decay/", "decay"),
        ("encoder-from-decoder-17m", "data/decay", "cross"),
        ("my-run-decay", "elsewhere", "decay"),
    ]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"run_name: {name}\ndata:\n  path: {path}\n")
        assert run_phase(run) == (phase, name)
    assert PREFIX["extension"] == "ext"
    assert model_name("encoder-17m-extension") == model_name("encoder-17m-decay") == "encoder-17m"


def _revision_folders(tmp_path: Path) -> Path:
    from ettin.interop.revisions import write_index

    out = tmp_path / "revs"
    index = {}
    for i, rev in enumerate(["step0", "step10", "ext5"]):
        (out / rev).mkdir(parents=True)
        (out / rev / "config.json").write_text("{}")
        phase = "extension" if rev.startswith("ext") else "pretrain"
        index[rev] = {"revision": rev, "phase": phase, "batch": i, "tokens": 10 * i, "run": "r"}
    write_index(out, index)
    return out


class _Api:
    """Records HfApi calls; an upload returns a commit (like huggingface_hub's CommitInfo)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(**kw):
            self.calls.append((name, kw))
            return SimpleNamespace(oid=f"commit{len(self.calls)}")

        return call

    def check_signatures(self):  # huggingface_hub's real HfApi has these keywords
        import inspect

        from huggingface_hub import HfApi

        for name, kw in self.calls:
            assert set(kw) <= set(inspect.signature(getattr(HfApi, name)).parameters), name


def test_publish_tags_each_revision_like_the_release(tmp_path):
    """The default: one commit per revision on main holding only that folder, tagged."""
    from ettin.cli import main as cli
    from ettin.interop.revisions import publish

    out = _revision_folders(tmp_path)
    api = _Api()
    pushed = publish(out, "me/ettin-test", api=api)
    assert pushed == ["step0", "step10", "ext5"]
    calls = api.calls
    assert not [n for n, _ in calls if n == "create_branch"]
    uploads = [(i, kw) for i, (n, kw) in enumerate(calls) if n == "upload_folder"]
    tags = [(i, kw) for i, (n, kw) in enumerate(calls) if n == "create_tag"]
    assert [kw["tag"] for _, kw in tags] == pushed
    for (i, up), (j, tag), rev in zip(uploads, tags, pushed):
        assert Path(up["folder_path"]).name == rev and up.get("revision") is None  # to main
        assert up["delete_patterns"] == "*"  # the commit holds exactly this revision
        assert j == i + 1 and tag["revision"] == f"commit{i + 1}"  # the tag is that commit
    assert calls[-1][0] == "upload_file" and calls[-1][1]["path_in_repo"] == "revisions.json"
    api.check_signatures()
    # the CLI: tags by default, --no-tags for branches
    import ettin.interop.revisions as revisions

    seen = []
    original = revisions.publish
    try:
        revisions.publish = lambda *a, **kw: seen.append(kw["tags"]) or []
        cli(["publish", str(out), "me/x"])
        cli(["publish", str(out), "me/x", "--no-tags"])
    finally:
        revisions.publish = original
    assert seen == [True, False]


def test_publish_pushes_each_revision_as_a_branch(tmp_path):
    from ettin.interop.revisions import publish

    out = _revision_folders(tmp_path)
    api = _Api()
    calls = api.calls
    pushed = publish(out, "me/ettin-test", api=api, main="ext5", tags=False)
    assert pushed == ["step0", "step10", "ext5"]  # phase order, then batch
    names = [c[0] for c in calls]
    assert names[0] == "create_repo" and calls[0][1]["exist_ok"] is True
    branches = [kw["branch"] for n, kw in calls if n == "create_branch"]
    uploads = [
        (Path(kw["folder_path"]).name, kw.get("revision"))
        for n, kw in calls
        if n == "upload_folder"
    ]
    assert branches == pushed
    assert uploads == [("step0", "step0"), ("step10", "step10"), ("ext5", "ext5"), ("ext5", None)]
    assert [kw["path_in_repo"] for n, kw in calls if n == "upload_file"] == ["revisions.json"]
    api.check_signatures()


def test_import_repo_at_revision_reaches_from_pretrained(tmp_path, monkeypatch):
    """`ettin import REPO@step599525`: the revision goes to every from_pretrained call."""
    import ettin.interop.hf as hf
    from ettin.cli import main
    from ettin.interop import export_hf
    from ettin.interop.revisions import split_revision
    from ettin.model import EttinModel, model_args

    assert split_revision("jhu-clsp/ettin-encoder-17m@step599525") == (
        "jhu-clsp/ettin-encoder-17m",
        "step599525",
    )
    assert split_revision("org/m", "ext10") == ("org/m", "ext10")
    with pytest.raises(ValueError, match="--revision says"):
        split_revision("org/m@a", "b")
    # a local clone: from_pretrained would ignore the tag and load the checked-out files
    (tmp_path / "clone").mkdir()
    with pytest.raises(ValueError, match="ignores a revision.*git -C .*clone checkout decay100"):
        split_revision(f"{tmp_path / 'clone'}@decay100")
    local = tmp_path / "hf-model"
    export_hf(EttinModel(model_args("test", vocab_size=72)), local)
    seen = []

    def redirect(fn):
        def call(name, *args, **kwargs):
            seen.append((fn.__qualname__, str(name), kwargs.pop("revision", None)))
            return fn(str(local), *args, **kwargs)

        return call

    for cls in (hf.AutoConfig, hf.AutoModelForMaskedLM):
        monkeypatch.setattr(cls, "from_pretrained", redirect(cls.from_pretrained))

    def no_tokenizer(name, **kwargs):  # as a Hub repo without tokenizer files
        seen.append(("AutoTokenizer", str(name), kwargs.get("revision")))
        raise OSError("no tokenizer")

    monkeypatch.setattr(hf.AutoTokenizer, "from_pretrained", no_tokenizer)
    monkeypatch.setattr(
        hf.PretrainedConfig, "get_config_dict", redirect(hf.PretrainedConfig.get_config_dict)
    )
    main(["import", "jhu-clsp/ettin-encoder-17m@step599525", str(tmp_path / "x.pt")])
    hub = [(q.split(".")[0], rev) for q, name, rev in seen if name != str(local)]
    assert {q for q, _ in hub} == {
        "AutoConfig",
        "PretrainedConfig",
        "_BaseAutoModelClass",
        "AutoTokenizer",
    }, seen
    assert all(rev == "step599525" for _, rev in hub), seen


# ---------------------------------------------------------------------------------------------
# Loss-spike guard


def _fake_state(losses_dict, batch, callbacks=()):
    stopped = []
    state = SimpleNamespace(
        total_loss_dict=losses_dict,
        timestamp=SimpleNamespace(batch=batch),
        callbacks=list(callbacks),
        stop_training=lambda: stopped.append(True),
    )
    return state, stopped


class _Logger:
    def log_metrics(self, metrics):
        pass


@pytest.mark.parametrize("action", ["stop", "rewind"])
def test_guard_triggers_on_spike_and_nan(tmp_path, action):
    from ettin.callbacks.loss_spike import LossSpikeGuard

    guard = LossSpikeGuard(window=4, ratio=2.0, action=action, run_dir=tmp_path)
    saver = type("CheckpointSaver", (), {"save_interval": lambda self, s, e: True})()
    for k, loss in enumerate([5.0, 4.0, 4.5, 4.2, 7.0, 4.1], start=1):  # 7.0 < 2 x median 4.35
        state, stopped = _fake_state({"loss/train/total": loss}, k, [saver])
        guard.batch_end(state, _Logger())
        assert not stopped
    state, stopped = _fake_state({"loss/train/total": 9.5}, 7, [saver])
    guard.batch_end(state, _Logger())
    assert stopped and guard.triggered["step"] == 6 and "median" in guard.triggered["reason"]
    events = json.loads((tmp_path / "loss_spike.json").read_text())
    assert events[-1]["batch"] == 7
    if action == "rewind":
        assert json.loads((tmp_path / "skip_steps.json").read_text())["skip_steps"] == [[6, 7]]
        assert saver.save_interval(None, None) is False  # the spiked weights are not saved
        assert "Rerun the same command to resume" in guard.message()
        assert "data.skip_steps" not in guard.message()  # the run folder's file is enough
    else:
        assert not (tmp_path / "skip_steps.json").exists()
        assert saver.save_interval(None, None) is True  # the end-of-run save happens
    # NaN is caught even before the window is full, and nothing is saved after it
    fresh = LossSpikeGuard(window=10, ratio=2.0, action="stop", run_dir=tmp_path / "n")
    state, stopped = _fake_state({"loss/train/total": float("nan")}, 1, [saver])
    fresh.batch_end(state, _Logger())
    assert stopped and not fresh.triggered["saved"] and saver.save_interval(None, None) is False
    # the window travels with checkpoints
    again = LossSpikeGuard(window=4, ratio=2.0, action=action, run_dir=tmp_path)
    again.load_state_dict(guard.state_dict())
    assert list(again.recent) == list(guard.recent)


def test_real_run_stops_at_an_injected_spike_with_a_checkpoint(world, monkeypatch):
    from ettin.callbacks.loss_spike import LossSpikeError
    from ettin.composer_model import EttinComposerModel
    from ettin.train import train

    calls = {"n": 0}
    original = EttinComposerModel.loss

    def spiky(self, outputs, batch):
        calls["n"] += 1
        loss = original(self, outputs, batch)
        return loss * 50 if calls["n"] == 6 else loss  # step 6 (batch index 5), 1 microbatch

    monkeypatch.setattr(EttinComposerModel, "loss", spiky)
    cfg = tiny_config(
        world,
        "spike",
        "mlm",
        "max_duration=10ba",
        "save_interval=100ba",
        "device_train_microbatch_size=8",
        "callbacks.loss_spike_window=3",
        "callbacks.loss_spike_ratio=3",
    )
    with pytest.raises(LossSpikeError, match="step 5.*checkpoint of batch 6 was saved"):
        train(cfg)
    run = Path(cfg.run_dir)
    assert (run / "checkpoints" / "ep0-ba6-rank0.pt").exists()
    assert (run / "checkpoints" / "latest-rank0.pt").resolve().name == "ep0-ba6-rank0.pt"
    assert not (run / "DONE").exists() and not (run / "hf").exists()
    assert max(losses(run)) == 5
    assert json.loads((run / "loss_spike.json").read_text())[0]["step"] == 5
