"""The GPU acceptance harness (`make gpu-check`): proves the GPU path of ettin on one GPU.

`check` measures (attention backends in bf16 against fp32, compiled throughput, 130 Composer
steps with kill -9 and resume); `verdict` holds the time budgets and the pass criteria and writes
the report. It runs from a checkout on the GPU machine's own python with `PYTHONPATH=src` and no
ettin install (`PYTHONPATH=src python3 -m ettin_gpu`). A package of its own on top of `ettin`:
it imports ettin, nothing in ettin imports it.
"""
