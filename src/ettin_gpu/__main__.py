"""`python -m ettin_gpu [options]`: the GPU check (`ettin_gpu.check.main`; `--help` lists options)."""

import sys

from ettin_gpu.check import main

sys.exit(main(sys.argv[1:]))
