"""``python -m slcompile.train``: the training CLI, kept at its documented name.

The implementation lives in :mod:`slcompile.recipes.train`; ``import slcompile`` does not load it.
"""
import sys

from slcompile.recipes.train import main

if __name__ == "__main__":
    sys.exit(main())
