"""Sequence classification with the HF Trainer (encoder or decoder export).

    python recipes/downstream/classify.py runs/demo/demo-encoder/hf --steps 60

Fine-tunes `AutoModelForSequenceClassification` (encoders pool [CLS] per the config's
`classifier_pooling`, decoders the last token) to tell a paragraph's era (offline classify task)
and prints held-out accuracy before and after. `--out` saves the model, tokenizer and config
(bos/eos ids included) for `from_pretrained`.
"""

from __future__ import annotations

from ettin.eval.downstream import cli, offline_tasks, report, trainer_args


def run(
    model: str,
    steps: int = 60,
    batch_size: int = 16,
    limit: int = 64,
    out=None,
    corpus=None,
    seed: int = 0,
) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    data = offline_tasks(corpus).classify
    names = data.label_names
    tokenizer = AutoTokenizer.from_pretrained(model)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        model,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )

    def dataset(texts, labels):
        enc = tokenizer(list(texts), truncation=True, max_length=128)
        return Dataset.from_dict({**enc, "labels": list(labels)})

    train = dataset(data.train_texts, data.train_labels)
    test = dataset(data.test_texts[:limit], data.test_labels[:limit])
    args = TrainingArguments(
        **trainer_args(out, steps, batch_size, seed, learning_rate=3e-4),
        per_device_eval_batch_size=batch_size,
    )
    trainer = Trainer(
        model=classifier,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )

    def accuracy() -> float:
        pred = trainer.predict(test)
        return float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())

    before = accuracy()
    trainer.train()
    after = accuracy()
    if out is not None:
        trainer.save_model(str(out))
    chance = 1 / len(names)
    return report(
        f"era classification ({len(names)} eras, chance {chance:.2f})", "accuracy", before, after
    )


if __name__ == "__main__":
    cli(__doc__, run)
