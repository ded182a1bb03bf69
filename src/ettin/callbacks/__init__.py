"""Composer callbacks of the recipe. LR logging is Composer's own `LRMonitor`, re-exported."""

from composer.callbacks import LRMonitor

from ettin.callbacks.grad_norm import GradNorm
from ettin.callbacks.hf_export import HFExport
from ettin.callbacks.packing import PackingEfficiency
from ettin.callbacks.speed import Throughput

# The data-order recorder (data_order.py, written separately) is exported here too:
# from ettin.callbacks.data_order import DataOrderRecorder

__all__ = ["GradNorm", "HFExport", "LRMonitor", "PackingEfficiency", "Throughput"]
