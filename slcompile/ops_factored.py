"""The factored SLTrain linear: ``y = scale * (x @ A.T) @ B.T + x @ S.T + bias``, ``W`` never formed.

Same parameters and result as ``slcompile::sl_linear`` (:mod:`slcompile.ops`); a schedule that
costs ``2 N (r (in + out) + nnz)`` FLOPs forward instead of forming ``W`` (``2 r in out``),
cheaper when tokens are few. :mod:`slcompile.path_policy` picks it per eager call,
:mod:`slcompile.passes.choose_path` in compiled graphs.

Ops (opaque to Dynamo/Inductor, like the ones of :mod:`slcompile.ops`):

- ``slcompile::sl_linear_factored(x, A, B, values, support, scale, bias?) -> y``
- ``slcompile::sl_linear_factored_backward(grad_y, x, A, B, values, support, scale, need_dx)
  -> (dx, dA, dB, dvalues)`` (``dx`` empty when ``need_dx`` is False)::

      dx      = scale * (dY @ B) @ A + dY @ S          # SpMM with S^T
      dB      = scale * dY^T @ (x @ A^T)
      dA      = scale * (dY @ B)^T @ x
      dvalues = (dY^T @ x)[support]                    # SDDMM: one dot product per nonzero

Autograd saves only ``x`` and the parameters, as ``nn.Linear`` does: ``x @ A^T`` ``(N, r)`` is
recomputed in backward (``2 N r in`` FLOPs, counted by the cost model) rather than saved. No
``(out, in)`` tensor exists at any point.

Sparse products (:data:`TORCH_SPARSE`): torch CSR tensors over the support (MKL on CPU, cuSPARSE
on CUDA; :mod:`slcompile.kernels` registers Triton ones for CUDA). These take fp32/fp64 only:
half operands are multiplied in fp32 and rounded once. Both run over blocks of
:data:`TOKEN_BLOCK` tokens, so the dense operand of one call stays in cache.

The CSR patterns of ``S`` and ``S^T`` (``3 nnz + in + out`` int32) are built once per support
tensor (:func:`slcompile.support.derived_index`). The support may be unsorted or hold repeats
(as ``sl_linear`` allows): repeats add up in ``S``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from slcompile.ops import autocast_off, make_backward, scaled_mm, setup_context, unflatten_rows
from slcompile.support import derived_index

__all__ = ["SparseIndex", "SparseProducts", "TORCH_SPARSE", "factored_backward", "factored_forward",
           "sl_linear_factored", "sl_linear_factored_backward", "sparse_index"]

_SPARSE_DTYPES = (torch.float32, torch.float64)  # what MKL / cuSPARSE SpMM and SDDMM take
TOKEN_BLOCK = 256  # tokens per sparse-library call (see the module doc)


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _spend_csr_beta_warning() -> None:
    """torch warns once per process (C++ warn-once) that CSR tensors are "beta"; these ops use only
    stable calls. The one warning is spent here, scoped, rather than wrapping every build in
    ``warnings.catch_warnings`` (which costs microseconds and resets the warning registries)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        _csr_tensor(torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), (1, 1))


_spend_csr_beta_warning()


@dataclass(frozen=True)
class SparseIndex:
    """The support of ``S (out, in)`` as int32 CSR patterns of ``S`` and of ``S^T``.

    ``order``: ``None`` if the support is sorted, else the permutation sorting it (``values[order]``
    is in CSR order); ``crow (out + 1,)``, ``col (nnz,)``: CSR of ``S``; ``t_order (nnz,)``: the
    CSR entries of ``S`` in column-major order (``S^T``'s CSR order); ``t_crow (in + 1,)``,
    ``t_col (nnz,)``: CSR of ``S^T``.
    """

    shape: tuple[int, int]
    order: Optional[Tensor]
    crow: Tensor
    col: Tensor
    t_order: Tensor
    t_crow: Tensor
    t_col: Tensor

    def csr_values(self, values: Tensor) -> Tensor:
        """``values`` (in the support's order) in the CSR order of ``S``."""
        return values if self.order is None else values.index_select(0, self.order)

    def csr_t_values(self, values: Tensor) -> Tensor:
        """``values`` (in the support's order) in the CSR order of ``S^T``."""
        order = self.t_order if self.order is None else self.order.index_select(0, self.t_order)
        return values.index_select(0, order)

    def csr(self, values: Tensor) -> Tensor:
        """``S`` as a sparse CSR tensor with ``values`` (in the support's order)."""
        return _csr_tensor(self.crow, self.col, self.csr_values(values), self.shape)

    def csr_t(self, values: Tensor) -> Tensor:
        """``S^T`` as a sparse CSR tensor with ``values`` (in the support's order)."""
        return _csr_tensor(self.t_crow, self.t_col, self.csr_t_values(values), self.shape[::-1])


@dataclass(frozen=True)
class SparseProducts:
    """The three sparse products of the factored path, for ``S (out, in)`` over ``index``:

    - ``s_x(index, values, x2d) -> (N, out)``: ``x2d (N, in) @ S^T``;
    - ``dy_s(index, values, g2d) -> (N, in)``: ``g2d (N, out) @ S``;
    - ``sampled(index, support, g2d, x2d, dtype) -> (nnz,)``: ``(g2d^T @ x2d)`` at the support,
      in the support's order, in ``dtype``.

    Results are new contiguous tensors in the dense operand's dtype (the factored ops add into the
    SpMM results in place). :data:`TORCH_SPARSE` is the reference (torch CSR);
    :mod:`slcompile.kernels` registers Triton ones for CUDA.
    """

    s_x: Callable[[SparseIndex, Tensor, Tensor], Tensor]
    dy_s: Callable[[SparseIndex, Tensor, Tensor], Tensor]
    sampled: Callable[[SparseIndex, Tensor, Tensor, Tensor, torch.dtype], Tensor]


def sparse_index(support: Tensor, out_features: int, in_features: int) -> SparseIndex:
    """The :class:`SparseIndex` of ``support``, built once per support tensor
    (:func:`slcompile.support.derived_index`)."""
    return derived_index(support, ("csr", support.numel(), out_features, in_features),
                         lambda: _build_sparse_index(support, out_features, in_features))


def _build_sparse_index(support: Tensor, out_features: int, in_features: int) -> SparseIndex:
    flat = support.reshape(-1).long()
    # The CSR is built unchecked: a bad index would be dropped silently (materialize raises).
    numel = out_features * in_features
    if flat.numel() and flat.device.type != "meta":
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= numel:
            raise IndexError(f"support has indices outside [0, {numel}) for a ({out_features}, {in_features}) "
                             f"weight: min {low}, max {high}")
    order = None
    if flat.numel() > 1 and not bool((flat[1:] >= flat[:-1]).all()):
        flat, order = torch.sort(flat, stable=True)
    rows, cols = flat // in_features, flat % in_features
    device = flat.device
    crow = torch.searchsorted(flat, torch.arange(out_features + 1, device=device) * in_features, out_int32=True)
    t_key, t_order = torch.sort(cols * out_features + rows, stable=True)
    t_crow = torch.searchsorted(t_key, torch.arange(in_features + 1, device=device) * out_features, out_int32=True)
    return SparseIndex((out_features, in_features), order, crow, cols.int(), t_order.int(), t_crow,
                       rows.index_select(0, t_order).int())


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _SPARSE_DTYPES else torch.float32


def _token_blocks(tokens: int) -> list[slice]:
    return [slice(start, start + TOKEN_BLOCK) for start in range(0, tokens, TOKEN_BLOCK)]


def _spmm(matrix: Tensor, dense: Tensor) -> Tensor:
    """``dense (N, k) @ matrix^T`` for ``matrix (m, k)`` sparse CSR, computed in ``matrix``'s dtype
    per token block and written into a new contiguous ``(N, m)`` tensor of ``dense``'s dtype (the
    caller adds the low-rank term into it in place: one ``(N, m)`` buffer, not two)."""
    out = dense.new_empty(dense.shape[0], matrix.shape[0])
    if matrix.values().numel() == 0:
        return out.zero_()
    for block in _token_blocks(dense.shape[0]):  # cast per block: no full-size fp32 copy of a half input
        out[block] = (matrix @ dense[block].t().to(matrix.dtype)).t()  # (k, block): each nonzero's token row
    return out


def _sddmm(index: SparseIndex, left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``(left @ right)`` at the support, in the support's order: ``left (out, N)``, ``right (N, in)``."""
    work = _sparse_dtype(dtype)
    # zeros: sampled_addmm with beta=0 still reads (and propagates) NaNs of its input
    sampled = _csr_tensor(index.crow, index.col, left.new_zeros(index.col.numel(), dtype=work), index.shape)
    left, right = left.to(work), right.to(work)
    for block in _token_blocks(right.shape[0]):  # accumulates into the previous block's result (beta=1)
        sampled = torch.sparse.sampled_addmm(sampled, left[:, block], right[block])
    sampled = sampled.values()
    if index.order is not None:
        sampled = torch.empty_like(sampled).index_copy_(0, index.order, sampled)
    return sampled.to(dtype)


def _torch_s_x(index: SparseIndex, values: Tensor, x2d: Tensor) -> Tensor:
    return _spmm(index.csr(values.to(_sparse_dtype(values.dtype))), x2d)


def _torch_dy_s(index: SparseIndex, values: Tensor, g2d: Tensor) -> Tensor:
    return _spmm(index.csr_t(values.to(_sparse_dtype(values.dtype))), g2d)


def _torch_sampled(index: SparseIndex, support: Tensor, g2d: Tensor, x2d: Tensor, dtype: torch.dtype) -> Tensor:
    return _sddmm(index, g2d.t(), x2d, dtype)


TORCH_SPARSE = SparseProducts(_torch_s_x, _torch_dy_s, _torch_sampled)


@autocast_off
def factored_forward(x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float,
                     bias: Optional[Tensor], sparse: SparseProducts) -> Tensor:
    """The body of ``sl_linear_factored`` with the sparse products of ``sparse``."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2d = x.reshape(-1, in_features)
    index = sparse_index(support, out_features, in_features)
    y = sparse.s_x(index, values, x2d).addmm_(torch.mm(x2d, A.t()), B.t(), alpha=scale)
    if bias is not None:
        y.add_(bias)
    return unflatten_rows(y, x.shape[:-1])


@autocast_off
def factored_backward(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor,
                      scale: float, need_dx: bool, sparse: SparseProducts) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of ``sl_linear_factored_backward`` with the sparse products of ``sparse``."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2d, g2d = x.reshape(-1, in_features), grad_y.reshape(-1, out_features)
    index = sparse_index(support, out_features, in_features)
    # Order for the lowest peak: the SpMM's block buffers, dY B and x A^T are never alive together.
    grad_x = sparse.dy_s(index, values, g2d) if need_dx else x.new_empty(0)
    grad_low = torch.mm(g2d, B)  # (N, r): dY @ B, shared by dx and dA
    if need_dx:
        grad_x = grad_x.addmm_(grad_low, A, alpha=scale).view(x.shape)
    grad_a = scaled_mm(grad_low.t(), x2d, scale)
    del grad_low
    grad_b = scaled_mm(g2d.t(), torch.mm(x2d, A.t()), scale)
    grad_values = sparse.sampled(index, support, g2d, x2d, values.dtype)
    return grad_x, grad_a, grad_b, grad_values


@torch.library.custom_op("slcompile::sl_linear_factored", mutates_args=())
def sl_linear_factored(x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float,
                       bias: Optional[Tensor] = None) -> Tensor:
    """``y (..., out) = scale * (x @ A.T) @ B.T + x @ S.T + bias`` for ``x (..., in)``; ``W`` never formed.

    ``A (r, in)``, ``B (out, r)``, ``values (nnz,)``, ``support (nnz,)`` int32/int64 flat
    row-major indices into ``(out, in)``; one float dtype for ``x`` and the parameters.
    """
    return factored_forward(x, A, B, values, support, scale, bias, TORCH_SPARSE)


@sl_linear_factored.register_fake
def _(x, A, B, values, support, scale, bias=None):
    return x.new_empty(*x.shape[:-1], B.shape[0])


@torch.library.custom_op("slcompile::sl_linear_factored_backward", mutates_args=())
def sl_linear_factored_backward(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor,
                                support: Tensor, scale: float, need_dx: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sl_linear_factored`` w.r.t. ``x``, ``A``, ``B``, ``values`` (bias is a plain sum).

    ``grad_y (..., out)``, ``x (..., in)``. ``dx`` is an empty tensor when ``need_dx`` is False.
    ``x @ A^T`` is recomputed here (see the module doc).
    """
    return factored_backward(grad_y, x, A, B, values, support, scale, need_dx, TORCH_SPARSE)


@sl_linear_factored_backward.register_fake
def _(grad_y, x, A, B, values, support, scale, need_dx):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(A), torch.empty_like(B), torch.empty_like(values)


sl_linear_factored.register_autograd(make_backward(sl_linear_factored_backward), setup_context=setup_context)
