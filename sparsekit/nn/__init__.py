"""Drop-in replacements for ``nn.Linear`` backed by compressed weights."""

from .low_rank import LowRankLinear, low_rank_saves_bytes
from .sparse_linear import SparseLinear

__all__ = ["LowRankLinear", "low_rank_saves_bytes"]
__all__ += ["SparseLinear"]
