"""Conversion between sparsekit's 2:4 packing and torch's semi-structured (CUTLASS) layout.

torch's ``SparseSemiStructuredTensorCUTLASS`` (what ``torch.sparse.to_sparse_semi_structured`` makes when
``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set, or without cuSPARSELt) holds a 2:4 matrix A: (rows, cols)
as two tensors, built by ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``:

* ``packed`` (rows, cols / 2), A's dtype: the two kept values of every group of 4 consecutive columns of a
  row, the lower column first;
* ``meta`` (rows, cols / 16) int16: per group a 4-bit code ``idx0 | idx1 << 2`` (the two kept positions,
  idx0 < idx1), four groups per int16 (group g at bits 4 * (g % 4)), then the int16 words reordered into the
  interleaved column-major layout CUTLASS's sparse tensor-core GEMM reads (CUTLASS
  ``tools/util/include/cutlass/util/host_reorder.h``, ``reorder_meta``; ported from torch's
  ``_calculate_meta_reordering_scatter_offsets``).

**Orientation.** Both group along the last dim of the matrix they store. For an ``nn.Linear`` weight
W: (out_features, in_features) that is the input dim, the same groups sparsekit prunes and packs (N:M along
``in_features``), and torch's own recipe sparsifies ``linear.weight`` as it stands
(``linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight))``). So no transpose: sparsekit's
``values`` *are* torch's ``packed`` (same shape, same order), and only the index encoding differs.

Supported: 2:4 in float16 / bfloat16 (torch's CUTLASS float32 layout is 1:2, one kept of every 2 for TF32
tensor cores, which sparsekit's 2:4 does not fit), rows a multiple of 32 and in_features a multiple of 64
(``SparseSemiStructuredTensorCUTLASS``'s minimum block for these dtypes in torch 2.13). Anything else raises a
``ValueError`` naming the constraint. The conversions are plain PyTorch on any device; building the tensor
subclass itself (``to_sparse_semi_structured_tensor``) follows torch, whose semi-structured matmuls need CUDA.

Groups with fewer than 2 non-zeros: sparsekit stores its lowest zero positions, torch's converter picks
its own (e.g. (2, 3) for an all-zero group). Both decode to the same dense matrix; ``meta`` then differs from
what ``to_sparse_semi_structured`` would build from that dense matrix, and equals it for every group with
exactly 2 non-zeros.
"""

from __future__ import annotations

import torch

from .sparse24 import nm_index_codes, nm_indices_from_codes

__all__ = ["to_torch_semi_structured", "from_torch_semi_structured", "to_sparse_semi_structured_tensor"]

# SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS (torch 2.13): sparse_min_rows, sparse_min_cols.
_CUTLASS_MIN_ROWS, _CUTLASS_MIN_COLS = 32, 64
_DTYPES = (torch.float16, torch.bfloat16)
_GROUPS_PER_WORD = 4  # 4-bit group codes per int16 meta word


def _check_shape_dtype(rows: int, cols: int, dtype: torch.dtype, what: str) -> None:
    if dtype not in _DTYPES:
        extra = (" (torch's CUTLASS float32 layout is 1:2, for TF32 tensor cores: a 2:4 weight does not fit it)"
                 if dtype == torch.float32 else "")
        raise ValueError(f"{what}: torch's semi-structured 2:4 layout holds float16 or bfloat16, got {dtype}{extra}")
    if rows % _CUTLASS_MIN_ROWS or cols % _CUTLASS_MIN_COLS or rows == 0 or cols == 0:
        raise ValueError(
            f"{what}: torch's semi-structured (CUTLASS) layout needs rows a positive multiple of {_CUTLASS_MIN_ROWS} "
            f"and in_features a positive multiple of {_CUTLASS_MIN_COLS}, got ({rows}, {cols})"
        )


def _meta_offsets(rows: int, meta_cols: int, device) -> torch.Tensor:
    """Flat positions, in the reordered meta, of meta[r, c] (row-major), for int16 meta words: CUTLASS's
    ColumnMajorInterleaved<2> layout with rows permuted in groups of 32 and 2x2 blocks swizzled."""
    dst_rows = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    dst_cols = torch.arange(meta_cols, device=device).expand(rows, meta_cols)
    dst_rows = dst_rows // 32 * 32 + (dst_rows % 8) * 4 + (dst_rows % 32) // 8
    topright = ((dst_rows % 2 == 0) & (dst_cols % 2 == 1)).to(torch.int64)
    bottomleft = ((dst_rows % 2 == 1) & (dst_cols % 2 == 0)).to(torch.int64)
    dst_rows = dst_rows + topright - bottomleft
    dst_cols = dst_cols - topright + bottomleft
    return ((dst_cols // 2) * rows * 2 + dst_rows * 2 + dst_cols % 2).reshape(-1)


def to_torch_semi_structured(values: torch.Tensor, index_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsekit 2:4 -> torch's CUTLASS layout: ``(packed, meta)`` as ``SparseSemiStructuredTensorCUTLASS``
    holds them.

    values: (out, in / 2) float16/bfloat16 and index_codes: (out, in / 8) uint8, as ``pack_nm(W, 2, 4)`` +
    ``nm_index_codes`` (or ``SparseLinear``'s buffers) give them for W: (out, in). Returns packed:
    (out, in / 2), values' dtype (a copy of values), and meta: (out, in / 16) int16. Raises ValueError for
    dtypes and shapes torch's layout does not take, and for codes that repeat a position in a group.
    """
    if values.dim() != 2 or index_codes.dim() != 2:
        raise ValueError(
            f"values and index_codes must be 2-D, got {tuple(values.shape)} and {tuple(index_codes.shape)}"
        )
    rows, kept = values.shape
    cols = 2 * kept
    _check_shape_dtype(rows, cols, values.dtype, "to_torch_semi_structured")
    if index_codes.dtype != torch.uint8 or tuple(index_codes.shape) != (rows, cols // 8):
        raise ValueError(f"index_codes must be uint8 ({rows}, {cols // 8}) for 2:4 codes of values "
                         f"{tuple(values.shape)}, got {index_codes.dtype} {tuple(index_codes.shape)}")
    indices = nm_indices_from_codes(index_codes, 4, kept).to(torch.int32).reshape(rows, cols // 4, 2)
    first, second = indices.unbind(-1)
    if bool((first >= second).any()):
        r, g = (int(v) for v in (first >= second).nonzero()[0])
        raise ValueError(f"index_codes: group {g} of row {r} keeps positions {int(first[r, g])}, "
                         f"{int(second[r, g])}; torch's layout needs two distinct positions, the lower first")
    nibbles = (first | (second << 2)).reshape(rows, cols // 16, _GROUPS_PER_WORD)
    shifts = torch.arange(_GROUPS_PER_WORD, device=values.device, dtype=torch.int32) * 4
    words = (nibbles << shifts).sum(-1)  # 0 .. 65535, as int32
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)  # the same 16 bits
    meta = torch.empty(rows * (cols // 16), dtype=torch.int16, device=values.device)
    meta.scatter_(0, _meta_offsets(rows, cols // 16, values.device), words.reshape(-1))
    return values.clone(), meta.reshape(rows, cols // 16)


def from_torch_semi_structured(packed, meta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CUTLASS layout -> sparsekit 2:4: ``(values, index_codes)`` for ``unpack_nm`` / ``nm_linear`` /
    ``SparseLinear`` (format "2:4", in_features = 2 * packed.shape[1]).

    packed: (out, in / 2) float16/bfloat16 and meta: (out, in / 16) int16, or a
    ``SparseSemiStructuredTensorCUTLASS`` (meta=None; its ``packed`` and ``meta`` are read). A group whose
    two positions come in decreasing order is stored with them (and its two values) swapped; a group that
    names one position twice raises ValueError.
    """
    if meta is None:
        if getattr(packed, "meta", None) is None or getattr(packed, "packed", None) is None:
            raise ValueError("pass (packed, meta), or a SparseSemiStructuredTensorCUTLASS holding both "
                             "(cuSPARSELt tensors keep their metadata inside packed and are not supported)")
        packed, meta = packed.packed, packed.meta
    if packed.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"packed and meta must be 2-D, got {tuple(packed.shape)} and {tuple(meta.shape)}")
    rows, kept = packed.shape
    cols = 2 * kept
    _check_shape_dtype(rows, cols, packed.dtype, "from_torch_semi_structured")
    if meta.dtype != torch.int16 or tuple(meta.shape) != (rows, cols // 16):
        raise ValueError(f"meta must be int16 ({rows}, {cols // 16}) for packed {tuple(packed.shape)}, "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    if meta.device != packed.device:
        raise ValueError(f"packed is on {packed.device} but meta on {meta.device}")
    words = meta.reshape(-1).gather(0, _meta_offsets(rows, cols // 16, meta.device)).to(torch.int32) & 0xFFFF
    shifts = torch.arange(_GROUPS_PER_WORD, device=meta.device, dtype=torch.int32) * 4
    nibbles = ((words.reshape(rows, cols // 16, 1) >> shifts) & 0xF).reshape(rows, cols // 4)
    first, second = nibbles & 3, (nibbles >> 2) & 3
    if bool((first == second).any()):
        r, g = (int(v) for v in (first == second).nonzero()[0])
        raise ValueError(f"meta: group {g} of row {r} names position {int(first[r, g])} twice")
    swap = first > second
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    pairs = packed.reshape(rows, cols // 4, 2)
    values = torch.where(swap.unsqueeze(-1), pairs.flip(-1), pairs).reshape(rows, kept).contiguous()
    indices = torch.stack((low, high), dim=-1).reshape(rows, kept).to(torch.uint8)
    return values, nm_index_codes(indices, 4)


def to_sparse_semi_structured_tensor(values: torch.Tensor, index_codes: torch.Tensor):
    """A ``torch.sparse.SparseSemiStructuredTensorCUTLASS`` of shape (out, in) from sparsekit 2:4 buffers, built
    from ``to_torch_semi_structured`` without going through the dense weight. torch's matmuls on it
    (``F.linear(x, it)``) run on CUDA only; ``.to_dense()`` works anywhere."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    packed, meta = to_torch_semi_structured(values, index_codes)
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size((values.shape[0], 2 * values.shape[1])), packed=packed, meta=meta, packed_t=None, meta_t=None,
        compressed_swizzled_bitmask=None,
    )
