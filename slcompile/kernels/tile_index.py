"""The support in tile order: what the epilogues of the tiled kernels walk.

The support is sorted row-major, so the entries of row ``m`` whose column lies in column tile
``c`` (columns ``[c * block_n, (c + 1) * block_n)``) form the contiguous range
``[tile_ptr[m, c], tile_ptr[m, c + 1])`` of the sorted support. A program owning the tile
``(rows, column tile c)`` of an ``(out, in)`` matrix walks its rows in lockstep: step ``k``
takes the ``k``-th entry of every row (a ``(BLOCK_M,)`` vector), for as many steps as the
fullest row of the tile has entries (``density * block_n`` on average: a handful).

``tile_ptr (out, in / block_n + 1)`` int32 is ``4 * out * (in / block_n + 1)`` bytes: a few
percent of the int32 support at paper densities. Built once per ``(support, shape, block_n)``
and cached (:func:`slcompile.support.derived_index`); shared by :mod:`.materialize` (adds the
values in its epilogue) and :mod:`.grad_weight` (gathers ``dvalues`` in its epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slcompile.support import derived_index

__all__ = ["TileIndex", "tile_index"]


@dataclass(frozen=True)
class TileIndex:
    """The support in tile order for one ``(out, in, block_n)``.

    ``support``: sorted flat indices (the support itself when it already was sorted);
    ``perm``: ``None`` if sorted, else the permutation that sorts it (``values[perm]`` is in
    ``support``'s order); ``tile_ptr (out, n_col_tiles + 1)`` int32: row ``m``'s entries in
    column tile ``c`` are ``support[tile_ptr[m, c]:tile_ptr[m, c + 1]]``.
    """

    support: Tensor
    perm: Tensor | None
    tile_ptr: Tensor
    block_n: int

    @property
    def n_col_tiles(self) -> int:
        return self.tile_ptr.shape[1] - 1


def tile_index(support: Tensor, out_features: int, in_features: int, block_n: int) -> TileIndex:
    """The :class:`TileIndex` of ``support (nnz,)`` (int32/int64 flat row-major indices into
    ``(out, in)``, any order, repeats allowed), cached per support tensor.

    A cache hit, i.e. every call after the first with this support, reads nothing back from the
    device (no host sync); an inference tensor is never cached, so each call builds. Building checks once whether ``support`` is sorted, a device sync,
    except during CUDA-graph capture, where a sync is an error: it then sorts without checking."""
    return derived_index(support, ("tiles", support.numel(), out_features, in_features, block_n),
                         lambda: _build(support, out_features, in_features, block_n))


def _build(support: Tensor, out_features: int, in_features: int, block_n: int) -> TileIndex:
    flat = support.reshape(-1)
    perm = None
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if flat.numel() > 1 and (capturing or not bool((flat[1:] >= flat[:-1]).all())):
        flat, perm = torch.sort(flat, stable=True)
    n_col_tiles = -(-in_features // block_n)
    col_starts = torch.arange(n_col_tiles + 1, device=flat.device, dtype=torch.int64) * block_n
    col_starts[-1] = in_features
    bounds = torch.arange(out_features, device=flat.device, dtype=torch.int64)[:, None] * in_features + col_starts
    tile_ptr = torch.searchsorted(flat, bounds.to(flat.dtype), out_int32=True)
    return TileIndex(flat, perm, tile_ptr, block_n)
