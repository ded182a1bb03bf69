"""Training entry point: `composer src/main.py yamls/<run>.yaml [key=value ...]`."""

import sys

from ettin.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
