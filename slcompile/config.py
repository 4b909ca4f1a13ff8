"""``SLConfig``: what ``transform`` replaces and with which SLTrain settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from slcompile._validate import check_int, check_number

DEFAULT_HEAD_NAMES = ("lm_head", "output", "embed_out", "score", "classifier", "qa_outputs", "head")
PATH_CHOICES = ("auto", "materialize", "factored")


def _check_patterns(field: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"SLConfig.{field} must be a string or a sequence of strings, got {value!r}") from None
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"SLConfig.{field} must hold non-empty strings (names or regexes), got {pattern!r}")
    return value


@dataclass(frozen=True)
class SLConfig:
    """Settings of an SLTrain transform: ``W = (alpha / r) * B @ A + S``.

    Exactly one of ``rank`` (absolute, ``1 <= rank <= min(in, out)`` of every target layer) and
    ``rank_ratio`` (fraction of ``min(in, out)`` in ``(0, 1]``, rounded, at least 1) must be given.

    Module selection: a module is matched by a pattern if the pattern equals its qualified name,
    equals a trailing part of it (``"q_proj"`` matches ``"layers.0.attn.q_proj"``) or is a regex
    that ``re.fullmatch``-es it. ``targets=None`` means every ``nn.Linear`` except those matched by
    ``head_names`` and those whose weight is tied to an ``nn.Embedding``.

    ``path``: how each layer computes in eager mode (:class:`~slcompile.SLLinear`): ``"materialize"``
    (form ``W``, one GEMM), ``"factored"`` (``x A^T B^T + x S^T``, no ``W``) or ``"auto"`` (per
    call, the cheaper of the two for that token count by :mod:`slcompile.cost_model`).
    """

    rank: Optional[int] = None
    rank_ratio: Optional[float] = None
    alpha: float = 32.0
    density: float = 0.03
    seed: int = 0
    targets: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES
    path: str = "auto"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError("SLConfig needs exactly one of `rank` (int >= 1) or `rank_ratio` (float in (0, 1]); "
                             f"got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}")
        if self.rank is not None:
            check_int("SLConfig.rank", self.rank, 1)
        if self.rank_ratio is not None:
            check_number("SLConfig.rank_ratio", self.rank_ratio, 0, 1, open_low=True)
        check_number("SLConfig.alpha", self.alpha, 0, open_low=True)
        check_number("SLConfig.density", self.density, 0, 1, open_low=True, open_high=True)
        check_int("SLConfig.seed", self.seed)
        if self.path not in PATH_CHOICES:
            raise ValueError(f"SLConfig.path must be one of {PATH_CHOICES}, got {self.path!r}")
        targets = None if self.targets is None else _check_patterns("targets", self.targets)
        if targets == ():
            raise ValueError("SLConfig.targets must name at least one module (use None for the default)")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        object.__setattr__(self, "head_names", _check_patterns("head_names", self.head_names))

    def rank_for(self, in_features: int, out_features: int, name: str = "") -> int:
        """The rank of a layer of shape ``(out, in)``; ``ValueError`` if it exceeds ``min(in, out)``."""
        limit = min(in_features, out_features)
        if self.rank is not None:
            if self.rank > limit:
                where = f" of layer {name!r}" if name else ""
                raise ValueError(f"SLConfig.rank={self.rank} exceeds min(in, out)={limit}{where} "
                                 f"(shape {out_features}x{in_features}); use a smaller rank or rank_ratio")
            return self.rank
        return max(1, min(limit, round(self.rank_ratio * limit)))
