"""slcompile: SLTrain (``W = (alpha / r) * B @ A + S``) for any PyTorch model.

Public API: :class:`SLConfig`, :class:`SLLinear`, :func:`transform`,
:func:`merge`, :mod:`slcompile.passes`.
"""
from slcompile import ops  # noqa: F401  (registers the slcompile:: custom ops)
from slcompile import ops_factored  # noqa: F401  (the factored, few-token path of the op)
from slcompile import flops  # noqa: F401  (FLOP formulas of the ops for FlopCounterMode)
from slcompile import optim  # noqa: F401  (slcompile.optim.build; torchao loads lazily)
from slcompile.config import SLConfig
from slcompile.layers import SLLinear, reset_sl_parameters
from slcompile.memory import param_count
from slcompile.transform import TransformReport, merge, transform
from slcompile import kernels  # noqa: E402,F401  (CUDA Triton implementations of the ops; after ops)
from slcompile._compat import register_dynamo_backend


def _load_backend():
    from slcompile.backend import slcompile_backend

    return slcompile_backend


# torch.compile(model, backend="slcompile") from a source tree too (no entry point without an install).
register_dynamo_backend("slcompile", _load_backend)

__all__ = ["SLConfig", "SLLinear", "TransformReport", "merge", "param_count", "reset_sl_parameters", "transform"]
__version__ = "0.1.0"
