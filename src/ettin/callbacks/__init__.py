"""Composer callbacks of the recipe. LR logging is Composer's own `LRMonitor`, re-exported."""

from composer.callbacks import LRMonitor

from ettin.callbacks.data_order import DataOrderRecorder
from ettin.callbacks.grad_norm import GradNorm
from ettin.callbacks.hf_export import HFExport
from ettin.callbacks.loss_spike import LossSpikeGuard, SaveStep0
from ettin.callbacks.packing import PackingEfficiency
from ettin.callbacks.rng import StepRNG
from ettin.callbacks.speed import Throughput

__all__ = [
    "DataOrderRecorder",
    "GradNorm",
    "HFExport",
    "LRMonitor",
    "LossSpikeGuard",
    "PackingEfficiency",
    "SaveStep0",
    "StepRNG",
    "Throughput",
]
