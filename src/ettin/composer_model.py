"""The Composer face of the model: forward on a batch, the loss, and the metrics."""

from __future__ import annotations

from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel
from torchmetrics import Metric

from ettin.model import EttinModel


class EttinComposerModel(ComposerModel):
    """Wraps `EttinModel`; the objective only decides which metrics are reported."""

    def __init__(self, model: EttinModel) -> None:
        super().__init__()
        self.model = model
        self.objective = "clm" if model.args.causal else "mlm"
        self.eval_metrics = self._metrics()

    def _metrics(self) -> dict[str, Metric]:
        if self.objective == "mlm":
            return {"CrossEntropy": LanguageCrossEntropy(), "MaskedAccuracy": MaskedAccuracy()}
        return {"CrossEntropy": LanguageCrossEntropy(), "Perplexity": LanguagePerplexity()}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("labels"))

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> Any:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Train metrics would cost an argmax over the vocabulary per step; the loss is logged anyway.
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        if outputs.targets.numel() == 0:  # nothing scored (e.g. FSDP's padding microbatch)
            return
        metric.update(outputs.logits.float(), outputs.targets)
