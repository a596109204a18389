"""LowRankLinear: y = (x @ V) @ (U S)^T + b, the factors of a truncated SVD of a linear layer's weight.

For W (out, in) at rank r it stores ``v`` (in, r) and ``us`` (out, r): r * (in + out) numbers instead of
in * out, two skinny GEMMs instead of one. That saves bytes (and decode time, which is memory-bound) only
when r < in * out / (in + out): ``from_linear`` refuses a rank that would not (LASER then writes the
reduced matrix back dense instead).
"""

from __future__ import annotations

import torch
from torch import nn

from ..svd import truncated_svd

__all__ = ["LowRankLinear", "low_rank_saves_bytes"]


def low_rank_saves_bytes(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-``rank`` factors are smaller than the dense (out, in) weight."""
    return rank * (in_features + out_features) < in_features * out_features


class LowRankLinear(nn.Module):
    """Same forward contract as ``nn.Linear`` (any leading dims, optional bias, the factors' dtype)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not (1 <= rank <= min(in_features, out_features)):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.us = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, method: str = "exact", **svd_kwargs) -> "LowRankLinear":
        """Factor ``linear.weight`` at ``rank`` (``sparsekit.svd.truncated_svd``); bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        out_f, in_f = linear.weight.shape
        if not low_rank_saves_bytes(out_f, in_f, rank):
            raise ValueError(f"rank {rank} factors of a {out_f}x{in_f} weight are not smaller than the weight "
                             f"(need rank < {in_f * out_f / (in_f + out_f):.1f}); keep it dense")
        u, s, v = truncated_svd(linear.weight, rank, method=method, **svd_kwargs)
        layer = cls(in_f, out_f, rank, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        layer.v.copy_(v)
        layer.us.copy_(u * s.unsqueeze(0))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features in the last dim, got {tuple(x.shape)}")
        return nn.functional.linear(x @ self.v, self.us, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight these factors represent."""
        return self.us @ self.v.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
