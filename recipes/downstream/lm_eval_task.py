"""lm-evaluation-harness on a local task file (no Hub): next-sentence multiple choice.

    python recipes/downstream/lm_eval_task.py runs/demo/demo-decoder/hf

Writes the offline `choice` task (a held-out paragraph so far; its true next sentence among four)
as a JSONL file plus an lm-eval task YAML, and runs `lm_eval.simple_evaluate` with the harness's
own `HFLM` on the exported decoder. "Before" is the same architecture with fresh random weights,
"after" the trained model. Any lm-eval task name works the same way where the Hub is reachable.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ettin.eval.downstream import cli, offline_tasks, report

TASK = "sotu_next_sentence"
TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{path}}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""  # the choices carry their leading space
metric_list:
  - metric: acc
"""


def write_task(folder: Path, corpus=None, limit: int = 64) -> Path:
    """`<folder>/sotu.jsonl` and `<folder>/sotu.yaml`: the local task lm-eval's TaskManager reads."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sotu.jsonl"
    with data.open("w") as f:
        for item in offline_tasks(corpus).choice[:limit]:
            row = {"context": item.context, "choices": list(item.choices), "label": item.label}
            f.write(json.dumps(row) + "\n")
    (folder / "sotu.yaml").write_text(TASK_YAML.format(path=data))
    return folder


def evaluate(model, tokenizer, task_dir: Path, batch_size: int = 8) -> float:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir))
    )
    return float(results["results"][TASK]["acc,none"])


def run(
    model: str,
    steps: int = 0,
    batch_size: int = 8,
    limit: int = 64,
    out=None,
    corpus=None,
    seed: int = 0,
) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    del steps  # nothing is trained: the figure is untrained -> trained
    task_dir = write_task(Path(out or tempfile.mkdtemp(prefix="ettin-lm-eval-")), corpus, limit)
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(seed)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    before = evaluate(untrained, tokenizer, task_dir, batch_size)
    after = evaluate(model, tokenizer, task_dir, batch_size)
    return report(f"lm-eval {TASK} (chance 0.25)", "acc", before, after)


if __name__ == "__main__":
    cli(__doc__, run)
