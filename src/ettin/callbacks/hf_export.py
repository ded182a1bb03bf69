"""Export the trained model in the Hugging Face format when training ends."""

from __future__ import annotations

from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def ettin_model(state: State) -> nn.Module:
    """The `ettin.model.EttinModel` inside the trainer's (possibly DDP-wrapped) ComposerModel."""
    model = state.model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    inner = getattr(model, "model", None)
    if inner is None:
        raise AttributeError(
            f"{type(model).__name__} has no `.model` (the wrapped EttinModel) to export"
        )
    return inner


class HFExport(Callback):
    """At `Event.FIT_END`, rank 0 writes the model with `ettin.interop.export_hf` to `out_dir`.

    Under FSDP (FSDP2, the only FSDP path) every rank gathers the full parameters (rank 0 keeps
    them) before the export; the other ranks wait at a barrier until rank 0 is done.
    """

    def __init__(
        self,
        out_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        max_seq_len: int | None = None,
        objectives: list[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.tokenizer_dir = tokenizer_dir
        # Recorded in the export: the trained length, and the lineage (objectives, oldest first).
        self.options = {"max_seq_len": max_seq_len, "objectives": objectives}

    def fit_end(self, state: State, logger: Logger) -> None:
        del logger
        from torch.distributed.fsdp import FSDPModule

        from ettin.interop import export_hf

        model = ettin_model(state)
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            model = self._gathered(model)
        if dist.get_global_rank() == 0:
            export_hf(model, self.out_dir, tokenizer=self.tokenizer_dir, **self.options)
        dist.barrier()

    @staticmethod
    def _gathered(model: nn.Module) -> nn.Module:
        """FSDP2: all ranks gather the full state dict (to rank 0's CPU); rank 0 gets a plain copy."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ettin.model import EttinModel

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=options)
        if dist.get_global_rank() != 0:
            return model
        plain = EttinModel(model.args)
        plain.load_state_dict(full)
        return plain
