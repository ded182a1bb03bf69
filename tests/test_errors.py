"""Errors look like what they are: a user's mistake is one line (exit 2), a bug a traceback.

Every error class ettin defines derives from `EttinError`, the user-facing ones from `UserError`
(the only ones `one_line_errors` turns into one line); none shadows a builtin name. The raise
sites a user reaches (a missing checkpoint, a bad model folder, a corpus without speeches, a bad
command line) raise a `UserError`; internal invariants stay plain exceptions with a traceback.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config, tiny_tokenizer

from ettin.errors import CheckpointError, EttinError, UsageError, UserError, one_line_errors

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ettin"


def _defined_errors() -> dict[str, str]:
    """{class name: module} of every `class ...Error` defined under src/ettin."""
    found = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found[node.name] = module.removesuffix(".__init__")
    return found


def test_every_error_class_has_the_one_base_and_shadows_no_builtin():
    errors = _defined_errors()
    assert {"ConfigError", "DataError", "CheckpointError", "PrepError", "LossSpikeError"} <= set(
        errors
    )
    shadowing = sorted(name for name in errors if hasattr(builtins, name))
    assert not shadowing, f"error classes named like builtins: {shadowing}"
    for name, module in errors.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, EttinError), f"{module}.{name} does not derive from EttinError"
        assert cls is EttinError or issubclass(cls, UserError), f"{module}.{name}"


# Builtins ettin raises on purpose, for bugs (internal invariants) and missing optional packages.
BUILTINS_RAISED = {
    "AttributeError",
    "ImportError",
    "IndexError",
    "KeyError",
    "LookupError",
    "NotImplementedError",
    "RuntimeError",
    "TypeError",
    "ValueError",
}


def test_every_raised_error_is_ours_or_an_ordinary_builtin():
    """A renamed class leaves no `raise OldName(...)` that silently means a builtin (the
    builtin ReferenceError once stood in for the reference format's error)."""
    ours = set(_defined_errors())
    odd = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", None))
                if name and name.endswith("Error") and name not in ours | BUILTINS_RAISED:
                    odd.append(f"{path.relative_to(SRC)}:{node.lineno} raises {name}")
    assert not odd, odd


def test_one_line_errors_converts_user_errors_only(capsys):
    with pytest.raises(SystemExit) as exit_info, one_line_errors("ettin x", debug=False):
        raise UsageError("give OUT")
    assert exit_info.value.code == 2 and capsys.readouterr().err == "ettin x: error: give OUT\n"
    for bug in (ValueError("an internal invariant"), FileNotFoundError("a file ettin expects")):
        with pytest.raises(type(bug)), one_line_errors("ettin x", debug=False):
            raise bug
    with pytest.raises(UsageError), one_line_errors("ettin x", debug=True):  # --debug
        raise UsageError("give OUT")


# A training entry with a bug planted: the model is fed MLM batches without labels, which the
# model refuses with a ValueError (an internal invariant, not the user's mistake).
BUGGY_ENTRY = """
import sys
import ettin.composer_model as cm
forward = cm.EttinComposerModel.forward
def no_labels(self, batch):
    return forward(self, {k: v for k, v in batch.items() if k != "labels"})
cm.EttinComposerModel.forward = no_labels
from ettin.train import main
main(sys.argv[1:])
"""


def _entry(tmp_path: Path, world: Path, *overrides: str) -> subprocess.CompletedProcess:
    from ettin.config import to_yaml

    cfg = tiny_config(world, "bug", "mlm", "max_duration=2ba", "callbacks.export_hf=false")
    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    (tmp_path / "buggy.py").write_text(BUGGY_ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("ETTIN_DEBUG", None)
    cmd = [sys.executable, str(tmp_path / "buggy.py"), str(tmp_path / "run.yaml"), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_an_internal_error_inside_training_shows_its_traceback(world, tmp_path):
    proc = _entry(tmp_path, world)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: the MLM forward needs labels" in proc.stderr
    assert "ettin train: error:" not in proc.stderr


def test_a_config_error_in_training_is_still_one_line(world, tmp_path):
    proc = _entry(tmp_path, world, "model.num_heads=3")  # 64 is not a multiple of 3
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ettin train: error:")]
    assert "model.hidden_size (64) must be a multiple of num_heads (3)" in line, line


def test_save_step0_with_two_savers_is_a_bug_not_a_user_error():
    from types import SimpleNamespace

    from ettin.callbacks.loss_spike import SaveStep0

    saver = type("CheckpointSaver", (), {})
    state = SimpleNamespace(
        timestamp=SimpleNamespace(batch=0), callbacks=[saver(), saver()], run_name="r"
    )
    with pytest.raises(RuntimeError, match="2 CheckpointSavers") as err:
        SaveStep0().fit_start(state, None)
    assert not isinstance(err.value, UserError)


def _write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_what_a_user_gets_wrong_raises_a_user_error(tmp_path):
    """The raise sites a user reaches name the problem (and were FileNotFoundError/ValueError)."""
    from ettin.eval.models import model_kind
    from ettin.eval.suite import parse_tasks
    from ettin.eval.tasks import read_speeches
    from ettin.interop import check_tokenizer
    from ettin.interop.revisions import export_all, publish, split_revision
    from ettin.model import model_args
    from ettin.train import init_from_checkpoint

    _write(tmp_path / "run" / "checkpoints" / "notes.txt")
    _write(tmp_path / "corpus" / "readme.md")
    small = model_args("test", vocab_size=8)
    cases = [
        (lambda: init_from_checkpoint(None, str(tmp_path / "nowhere.pt")), CheckpointError),
        (lambda: model_kind(tmp_path), CheckpointError),  # no config.json
        (lambda: check_tokenizer(tiny_tokenizer(), small), CheckpointError),
        (lambda: export_all(tmp_path / "run", tmp_path / "out"), CheckpointError),
        (lambda: publish(tmp_path / "out", "me/model"), UsageError),
        (lambda: split_revision("repo@", None), UsageError),
        (lambda: parse_tasks(["nonsense"]), UsageError),
        (lambda: read_speeches(tmp_path / "missing"), UserError),
        (lambda: read_speeches(tmp_path / "corpus"), UserError),
    ]
    for call, expected in cases:
        with pytest.raises(expected):
            call()


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    from ettin.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "ckpt.pt")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == "ettin export: error: ettin export CHECKPOINT OUT_DIR: OUT_DIR is missing\n"
    )
