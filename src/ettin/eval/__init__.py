"""Evaluation: encoders and decoders scored on the same tasks, side by side.

Modules: `models` (loading exported HF models; the scoring interface), `intrinsic` (MLM and CLM
tasks for both kinds, perplexity), `choice` (multiple choice by log-likelihood or
pseudo-log-likelihood; the lm-evaluation-harness adapter), `classify` (fine-tuned pooled
heads), `retrieval` (contrastive embeddings, nDCG@10), `bias` (pronoun preference), `tasks`
(offline tasks from the bundled speeches; Hub benchmarks), `suite` (`run_suite`: tasks x models
-> results.md / .csv / .png, and `TASKS`, the table of tasks), `cli` (`ettin eval`). Kept
import-free so `ettin --help` stays fast.
"""
