"""``SLLinear``: a linear layer with weight ``W = (alpha / r) * B @ A + S`` (SLTrain)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from slcompile import eager, ops, ops_factored, path_policy
from slcompile._compat import autocast_available
from slcompile._validate import check_int
from slcompile.config import SLConfig
from slcompile.support import generate_support, nnz_for

# What a tensor answers without data: SLWeight runs these on itself, everything else on the dense W.
_METADATA = {Tensor.dtype.__get__, Tensor.device.__get__, Tensor.shape.__get__, Tensor.ndim.__get__,
             Tensor.requires_grad.__get__, Tensor.is_cuda.__get__, Tensor.layout.__get__, Tensor.size, Tensor.dim,
             Tensor.numel, Tensor.is_floating_point, Tensor.is_complex, Tensor.element_size}
_DATA = Tensor.data.__get__  # compared with ==: each attribute access makes a new method-wrapper


class SLWeight(Tensor):
    """``SLLinear.weight``: a storage-less ``(out, in)`` tensor standing for ``W = scale * B @ A + S``.

    Metadata reads (``dtype``, ``device``, ``shape``/``size()``, ``ndim``/``dim()``, ``requires_grad``,
    ``numel()``, ``is_floating_point()``, ``element_size()``) answer from the layer and cost nothing.
    Any other use (an op, ``F.linear(x, w)``, ``.float()``, ``.numpy()``, printing) runs on the
    dense ``W`` formed for that use: one ``(out, in)`` tensor and a rank-``r`` GEMM each time,
    differentiable into ``A``, ``B`` and ``values``. ``.data`` and ``.detach()`` give a detached
    ``SLWeight`` (``W`` formed on use, no gradient). In-place writes raise, through those too
    (``weight.data.copy_(w)`` would otherwise write into a temporary and be lost): the layer's
    trainable state is ``A``, ``B`` and ``values``.
    """

    layer: "SLLinear"
    detached: bool

    @staticmethod
    def __new__(cls, layer: "SLLinear", detached: bool = False) -> "SLWeight":
        params = (layer.A, layer.B, layer.values)
        requires_grad = not detached and any(p.requires_grad for p in params)
        view = Tensor._make_wrapper_subclass(cls, (layer.out_features, layer.in_features), dtype=layer.A.dtype,
                                             device=layer.A.device, requires_grad=requires_grad)
        view.layer, view.detached = layer, detached
        return view

    def _dense(self) -> Tensor:
        weight = self.layer.dense_weight()
        return weight.detach() if self.detached else weight

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if (func is Tensor.detach or func == _DATA) and isinstance(args[0], cls):
            return cls(args[0].layer, detached=True)
        name = getattr(func, "__name__", "")
        written = args[0] if args else next(iter(kwargs.values()), None)  # nn.init passes tensor=
        if (name.endswith("_") and not name.endswith("__") or name.startswith("__i") or name == "__set__") \
                and isinstance(written, cls):
            raise RuntimeError(f"SLLinear.weight is W = scale * B @ A + S, formed on use: in-place {name} cannot "
                               "change it; change the layer's A, B or values (or merge the model first)")
        args, kwargs = torch.utils._pytree.tree_map_only(cls, lambda w: w._dense(), (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only where torch functions are disabled (below autograd): the values, detached.
        args, kwargs = torch.utils._pytree.tree_map_only(cls, lambda w: w.layer.dense_weight().detach(),
                                                         (args, kwargs or {}))
        return func(*args, **kwargs)


class SLLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features, bias)`` for pretraining.

    Trainable parameters: ``A (r, in)``, ``B (out, r)``, ``values (nnz,)`` and optional
    ``bias (out,)``. Buffer: ``support (nnz,)`` int32 sorted flat indices into ``(out, in)``,
    fixed at construction from ``(seed, out, in, nnz)`` (see :mod:`slcompile.support`).
    Init as the paper: ``A`` kaiming-uniform(a=sqrt(5)), ``B`` zeros, ``values`` and ``bias``
    U(-1/sqrt(in), 1/sqrt(in)); so at step 0 the layer is ``S`` alone.

    Input ``(..., in)`` in the parameters' dtype (or any float dtype under autocast), output
    ``(..., out)``. Only ``x`` is saved for backward, as for ``nn.Linear``, on either path.

    ``path``: ``"materialize"`` (``slcompile::sl_linear``: form ``W``, one GEMM), ``"factored"``
    (``slcompile::sl_linear_factored``: ``x A^T B^T + x S^T``, no ``(out, in)`` tensor) or
    ``"auto"``: per call in eager mode, the one :func:`slcompile.path_policy.choose_path_for_call`
    estimates cheaper for this token count, device type, dtype and mode (training if a gradient
    will flow, else forward), with rates measured on this CPU (:mod:`slcompile.calibration`) or
    a device preset; few tokens (decoding, small batches) go factored. Under
    ``torch.compile`` and FX tracing ``"auto"`` traces the materialize op (the backend's
    ``choose_path`` pass decides there, on static shapes).

    ``weight``: for code written against ``nn.Linear`` (``module.weight.dtype``), an :class:`SLWeight`
    (metadata free, values formed on use); not a parameter or state_dict entry. ``dense_cls``: the
    module ``slcompile.merge`` gives back (``nn.Linear``, or ``Conv1D`` where ``transform`` replaced one).
    """

    dense_cls: type[nn.Module] = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 alpha: float = 32.0, density: float = 0.03, seed: int = 0, path: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for field, size in (("in_features", in_features), ("out_features", out_features)):
            check_int(f"SLLinear.{field}", size, 1)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SLLinear needs a floating-point dtype, got {dtype}")
        # SLConfig owns the validation of rank/alpha/density/seed, so both entry points agree.
        SLConfig(rank=rank, alpha=alpha, density=density, seed=seed, path=path).rank_for(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.path = path
        self.rank, self.alpha, self.density, self.seed = rank, float(alpha), float(density), seed
        self.scale = self.alpha / rank
        self.nnz = nnz_for(in_features, out_features, density)
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.values = nn.Parameter(torch.empty(self.nnz, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("support", torch.empty(self.nnz, dtype=torch.int32, device=device))
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, alpha: float = 32.0, density: float = 0.03,
                    seed: int = 0, path: str = "auto") -> "SLLinear":
        """An ``SLLinear`` of the same shape, device and dtype, freshly initialized as the paper.

        The dense weight is not carried over (SLTrain pretrains from scratch); the bias is.
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank,
                    alpha=alpha, density=density, seed=seed, path=path, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper init of ``A``, ``B``, ``values``, ``bias``; regenerates ``support`` from the seed.

        Call after ``to_empty()`` to materialize a layer built on the meta device.
        """
        self.support.copy_(generate_support(self.out_features, self.in_features, self.nnz, self.seed,
                                            device=self.support.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> Tensor:
        """``W (out, in)``: an :class:`SLWeight` in eager mode; under ``torch.compile`` or FX tracing the
        dense ``W`` itself (the compiler drops it when only its metadata is read)."""
        if torch.compiler.is_compiling() or is_fx_symbolic_tracing():
            return self.dense_weight()
        return SLWeight(self)

    def dense_weight(self) -> Tensor:
        """``W (out, in) = scale * B @ A + S`` in the parameters' dtype (differentiable)."""
        return ops.materialize(self.A, self.B, self.values, self.support, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        # fx.symbolic_trace feeds Proxies that cannot answer shape/dtype questions: trace the op alone.
        if is_fx_symbolic_tracing():
            return self._op(None)(x, self.A, self.B, self.values, self.support, self.scale, self.bias)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"SLLinear expects input (..., {self.in_features}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"SLLinear expects a floating-point input, got {x.dtype}")
        params = (self.A, self.B, self.values, self.bias)
        device = x.device.type
        autocast = (autocast_available(device) and torch.is_autocast_enabled(device)
                    and x.dtype != torch.float64)  # autocast leaves fp64 alone, as for nn.Linear
        if autocast:
            # Custom ops bypass autocast: cast here; the casts keep fp32 master weights trainable.
            dtype = torch.get_autocast_dtype(device)
            x, *params = (None if t is None else t.to(dtype) for t in (x, *params))
        elif x.dtype != self.A.dtype:
            raise TypeError(f"SLLinear input dtype {x.dtype} differs from its parameters' {self.A.dtype}; "
                            "cast the input or the module, or use torch.autocast")
        A, B, values, bias = params
        return self._op(x, A, B, values, bias)(x, A, B, values, self.support, self.scale, bias)

    def path_for(self, x: Tensor | None) -> str:
        """``"materialize"`` or ``"factored"``: the path a call on input ``x`` takes. ``self.path``,
        or for ``"auto"`` the cost model's pick for this token count, device, dtype and mode
        (:func:`slcompile.path_policy.choose_path_for_call`); materialize when tracing (``x`` is
        ``None`` or compiling: the backend's ``choose_path`` pass decides there)."""
        if self.path != "auto":
            return self.path
        if x is None or torch.compiler.is_compiling():
            return "materialize"
        training = torch.is_grad_enabled() and (x.requires_grad or self.A.requires_grad or self.B.requires_grad
                                                or self.values.requires_grad)
        return path_policy.choose_path_for_call(x.numel() // self.in_features, self.in_features, self.out_features,
                                                self.rank, self.nnz, x.device.type,
                                                "train" if training else "forward", x.element_size())

    def _op(self, x: Tensor | None, *params: Tensor):
        """What runs this call: the custom op of :meth:`path_for`, or where :func:`slcompile.eager.can_run`
        the same bodies as an ``autograd.Function`` without the dispatcher's overhead; under
        ``torch.func`` transforms the materialize path's bodies (:class:`slcompile.eager.FuncMaterialized`)."""
        if x is not None and eager.functorch_active():
            return eager.FuncMaterialized.apply
        factored = self.path_for(x) == "factored"
        if x is not None and eager.can_run(x, *params):
            return (eager.EagerFactored if factored else eager.EagerMaterialized).apply
        return ops_factored.sl_linear_factored if factored else ops.sl_linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, density={self.density}, nnz={self.nnz}, bias={self.bias is not None}, "
                f"path={self.path!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        support = state_dict.get(prefix + "support")
        if support is not None and support.device.type != "meta":
            self._check_loaded_support(prefix + "support", support)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_support(self, key: str, support: Tensor) -> None:
        """Refuse a corrupt support before it overwrites the current one."""
        if support.is_floating_point() or support.dim() != 1:
            raise ValueError(f"corrupt checkpoint: {key} has shape {tuple(support.shape)} and dtype "
                             f"{support.dtype}, expected ({self.nnz},) integer")
        if support.numel() != self.nnz:
            raise ValueError(f"checkpoint does not match this layer: {key} has shape {tuple(support.shape)}, "
                             f"expected ({self.nnz},) (density {self.density} of {self.out_features} x "
                             f"{self.in_features}); saved from a layer with another density or shape, or corrupt")
        numel = self.in_features * self.out_features
        if self.nnz and (int(support.min()) < 0 or int(support.max()) >= numel):
            raise ValueError(f"corrupt checkpoint: {key} has indices outside [0, {numel})")
        if torch.unique(support).numel() != self.nnz:
            raise ValueError(f"corrupt checkpoint: {key} has duplicate indices")


def reset_sl_parameters(model: nn.Module) -> int:
    """``reset_parameters()`` on every ``SLLinear`` of ``model`` (e.g. after ``to_empty``); returns the count."""
    layers = [m for m in model.modules() if isinstance(m, SLLinear)]
    for layer in layers:
        layer.reset_parameters()
    return len(layers)
