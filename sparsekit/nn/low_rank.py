"""LowRankLinear: y = (x @ V) @ (U S)^T + b, the factors of a truncated SVD of a linear layer's weight.

For W (out, in) at rank r it stores ``v`` (in, r) and ``us`` (out, r): r * (in + out) numbers instead of
in * out, two skinny GEMMs instead of one. That saves bytes (and decode time, which is memory-bound) only
when r < in * out / (in + out): ``from_linear`` and ``from_factors`` refuse a rank that would not (LASER then
writes the reduced matrix back dense instead).

The class is registered with ``sparsekit.compressed``: ``save_compressed`` records its constructor arguments
and ``load_compressed`` rebuilds it, so a model with LowRankLinear layers round-trips with its factors.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import as_int
from ..compressed import register_compressed_module
from ..svd import truncated_svd

__all__ = ["LowRankLinear", "low_rank_saves_bytes"]


def low_rank_saves_bytes(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-``rank`` factors are smaller than the dense (out, in) weight."""
    return rank * (in_features + out_features) < in_features * out_features


def _check_saves_bytes(out_f: int, in_f: int, rank: int) -> None:
    if as_int(rank, "rank") < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    if not low_rank_saves_bytes(out_f, in_f, rank):
        raise ValueError(f"rank {rank} factors of a {out_f}x{in_f} weight are not smaller than the weight "
                         f"(need rank < {in_f * out_f / (in_f + out_f):.1f}); keep it dense")


@register_compressed_module
class LowRankLinear(nn.Module):
    """Same forward contract as ``nn.Linear`` (any leading dims, optional bias, the factors' dtype)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"rank must be an int, got {rank!r} ({type(rank).__name__})")
        if not (1 <= rank <= min(in_features, out_features)):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.us = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random start with nn.Linear's scale: us @ v^T has the variance of nn.Linear's default weight
        (uniform(+-1/sqrt(in)), variance 1/(3 in)), and the bias is drawn as nn.Linear draws it.
        (from_linear / from_factors overwrite all of it; a layer built directly starts usable, not garbage.)"""
        if self.v.is_meta:
            return
        # var(sum_r us_ir v_jr) = rank * var(us) * var(v) = 1 / (3 in): both factors at (1 / (3 in rank))^(1/2)
        std = (1.0 / (3.0 * self.in_features * self.rank)) ** 0.25
        nn.init.normal_(self.v, 0.0, std)
        nn.init.normal_(self.us, 0.0, std)
        if self.bias is not None:
            bound = 1.0 / self.in_features ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, rank: int, method: str = "exact", **svd_kwargs) -> "LowRankLinear":
        """Factor the weight of ``linear`` (``nn.Linear``, or transformers' ``Conv1D`` whose weight is stored
        (in, out)) at ``rank`` with ``sparsekit.svd.truncated_svd``; the bias is copied."""
        from ..models import is_linear, linear_weight

        if not is_linear(linear):
            raise TypeError(f"expected nn.Linear or Conv1D, got {type(linear).__name__}")
        weight = linear_weight(linear)
        out_f, in_f = weight.shape
        _check_saves_bytes(out_f, in_f, rank)
        u, s, v = truncated_svd(weight, rank, method=method, **svd_kwargs)
        return cls.from_factors(u, s, v, linear.bias)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "LowRankLinear":
        """The layer W = U diag(S) V^T (+ bias) from SVD factors U (out, r), S (r,), V (in, r).

        Stores ``us = U * S`` and ``v`` in U's dtype and device. Refuses ranks that do not save bytes.
        """
        if u.dim() != 2 or v.dim() != 2 or s.dim() != 1 or not (u.shape[1] == v.shape[1] == s.shape[0]):
            raise ValueError(f"factors must be U (out, r), S (r,), V (in, r); got {tuple(u.shape)}, "
                             f"{tuple(s.shape)}, {tuple(v.shape)}")
        (out_f, rank), in_f = u.shape, v.shape[0]
        _check_saves_bytes(out_f, in_f, rank)
        layer = cls(in_f, out_f, rank, bias=bias is not None, device=u.device, dtype=u.dtype)
        layer.v.copy_(v)
        layer.us.copy_(u * s.unsqueeze(0))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features in the last dim, got {tuple(x.shape)}")
        return nn.functional.linear(x @ self.v, self.us, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight these factors represent."""
        return self.us @ self.v.t()

    # sparsekit.compressed: constructor arguments out, an empty layer of the same shapes back.
    def compressed_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_compressed_spec(cls, spec: dict, dtype: torch.dtype, device) -> "LowRankLinear":
        return cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                   bias=bool(spec["bias"]), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
