"""The fixed random support of the sparse term ``S``.

A support is ``nnz = int(density * in * out)`` distinct flat (row-major) positions of the
``(out, in)`` weight, drawn uniformly without replacement over the whole matrix, sorted and
stored as ``int32`` (4 bytes per nonzero, half of the reference's int64).

It depends only on ``(seed, out, in, nnz)`` and uses a private ``torch.Generator``: the global
RNG is never touched, so every data-parallel rank and every rerun gets the same support.
``transform`` derives each layer's ``seed`` from the config seed and the module's name.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Hashable, TypeVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_INT32_LIMIT = 2**31 - 1
_T = TypeVar("_T")
_DERIVED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def layer_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed for the layer called ``name`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{base_seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def nnz_for(in_features: int, out_features: int, density: float) -> int:
    """Number of nonzeros of ``S``: ``int(density * in * out)`` exactly as the paper counts."""
    return int(density * in_features * out_features)


def _unique_in_draw_order(draws: torch.Tensor) -> torch.Tensor:
    """Distinct values of ``draws`` ordered by their first occurrence."""
    uniq, inverse = torch.unique(draws, return_inverse=True)
    first = torch.full_like(uniq, draws.numel()).scatter_reduce_(
        0, inverse, torch.arange(draws.numel()), reduce="amin")
    return uniq[first.argsort()]


def generate_support(out_features: int, in_features: int, nnz: int, seed: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Draw the support: an ``int32`` tensor ``(nnz,)`` of sorted distinct flat indices.

    Sequential rejection sampling (keep the first ``nnz`` distinct values of an i.i.d. uniform
    stream) yields a uniform random ``nnz``-subset with O(nnz) memory, unlike ``randperm``.
    """
    numel = out_features * in_features
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} must lie in [0, {numel}] for a {out_features}x{in_features} weight")
    if numel > _INT32_LIMIT:
        raise ValueError(f"a {out_features}x{in_features} weight has more than 2**31-1 entries: "
                         "its support does not fit int32 flat indices")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        return torch.empty(nnz, dtype=torch.int32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(
        layer_seed(seed, f"{out_features}x{in_features}:{nnz}"))
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < nnz:
        missing = nnz - chosen.numel()
        # Oversample by the expected collision rate so one round almost always suffices.
        hit_rate = 1.0 - (chosen.numel() + missing) / numel / 2
        extra = torch.randint(numel, (int(missing / max(hit_rate, 0.05)) + 16,), generator=gen)
        chosen = _unique_in_draw_order(torch.cat([chosen, extra]))
    return chosen[:nnz].sort().values.to(device=device, dtype=torch.int32)


def derived_index(support: torch.Tensor, key: Hashable, build: Callable[[], _T]) -> _T:
    """``build()`` once per ``(support tensor, key)``: an index derived from the support (CSR
    patterns, tile offsets) kept while the tensor lives and its contents are unchanged.

    Entries are keyed on the tensor object and dropped when its version counter moves (an
    in-place change rebuilds them); ``key`` must name everything else the index depends on
    (shape, block sizes). Inference tensors have no version counter and are never cached.
    Pass the persistent support buffer, not a fresh ``.long()`` copy, or nothing is reused.
    """
    if support.is_inference():
        return build()
    entry = _DERIVED.get(support)
    if entry is None or entry[0] != support._version:
        entry = (support._version, {})
        _DERIVED[support] = entry
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]
