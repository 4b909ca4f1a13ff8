"""Training recipes built on the slcompile library: models, data, the training CLI, distributed
runs, the demo, sweeps and comparisons.

Install with ``pip install 'slcompile[train]'``. The library (``import slcompile``) never imports
this package; the recipes import the library.
"""
