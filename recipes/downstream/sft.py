"""Supervised fine-tuning of a decoder with TRL's SFTTrainer (plain text or chat).

    python recipes/downstream/sft.py runs/demo/demo-decoder/hf --steps 60
    python recipes/downstream/sft.py runs/demo/demo-decoder/hf --chat   # conversational data

The task: given a paragraph's first half, write its second half (the offline retrieval pairs).
Plain text trains on whole paragraphs; `--chat` turns each pair into a user/assistant exchange
rendered by `chat_template.jinja` beside this file (a base Ettin decoder has no chat template;
pass your own with `--chat-template FILE`). Prints held-out loss before and after.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ettin.eval.downstream import report, retrieval_split, trainer_args


def _rows(pairs, chat: bool) -> dict:
    if chat:
        return {
            "messages": [
                [
                    {"role": "user", "content": "Continue the speech: " + q},
                    {"role": "assistant", "content": p},
                ]
                for q, p in pairs
            ]
        }
    return {"text": [f"{q} {p}" for q, p in pairs]}


CHAT_TEMPLATE = Path(__file__).resolve().parent / "chat_template.jinja"
"""A minimal chat template for SFT of a base Ettin decoder (base models ship none)."""


def run(
    model: str,
    steps: int = 60,
    batch_size: int = 8,
    limit: int = 64,
    out=None,
    corpus=None,
    seed: int = 0,
    chat: bool = False,
    chat_template: str | None = None,
) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    pairs, queries, passages, qrels = retrieval_split(corpus, limit)
    test = [(queries[q], passages[next(iter(qrels[q]))]) for q in queries]
    config = SFTConfig(
        **trainer_args(out, steps, batch_size, seed, learning_rate=3e-4),
        max_length=192,
        per_device_eval_batch_size=batch_size,
        chat_template_path=str(chat_template or CHAT_TEMPLATE) if chat else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict(_rows(pairs, chat)),
        eval_dataset=Dataset.from_dict(_rows(test, chat)),
    )
    first = next(iter(trainer.get_train_dataloader()))
    row = first["input_ids"][0][first["attention_mask"][0].bool()].tolist()
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    if out is not None:
        trainer.save_model(str(out))
    name = "SFT (TRL, " + ("chat" if chat else "plain text") + ")"
    return report(
        name,
        "held-out loss",
        before,
        after,
        first_row=row,
        perplexity=(math.exp(before), math.exp(after)),
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "model", help="exported decoder folder, or a Hub name (jhu-clsp/ettin-decoder-...)"
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=64, help="held-out examples to score")
    p.add_argument("--out", type=Path, default=None, help="where to save the fine-tuned model")
    p.add_argument("--corpus", default=None, help="speech folder (default: the bundled corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="conversational data and a chat template")
    p.add_argument(
        "--chat-template", default=None, help=f"Jinja file (default {CHAT_TEMPLATE.name})"
    )
    run(**vars(p.parse_args()))
