"""Compressed weight formats for pruned linear layers (plain PyTorch, pure functions).

* ``sparse24`` N:M structured sparsity (2:4, 4:8, ... with M <= 16): per row, the kept values of every
  group of M consecutive input weights plus their positions in the group (``pack_nm`` / ``unpack_nm``),
  and the compact 2- or 4-bit index codes the kernels read (``nm_index_codes``).
* ``bitmap``   unstructured sparsity: a 64-bit mask per 64-column tile of a row, the non-zeros packed in
  row-major order, and per-row offsets into them (``pack_bitmap`` / ``unpack_bitmap``).
* ``semi_structured`` conversion of 2:4 float16/bfloat16 weights to and from torch's semi-structured
  (CUTLASS) layout (``to_torch_semi_structured`` / ``from_torch_semi_structured``).

The formats hold tensors and nothing else; ``sparsekit.ops.nm_linear`` / ``bitmap_linear`` compute with them,
and ``sparsekit.ops.nm_unpack`` / ``bitmap_unpack`` are the C++ (CPU) versions of ``unpack_nm`` /
``unpack_bitmap`` on the kernels' form (index codes instead of indices).
"""

from .bitmap import BITMAP_TILE, BitmapPacked, bitmap_row_counts, check_bitmap_packed, pack_bitmap, unpack_bitmap
from .semi_structured import from_torch_semi_structured, to_sparse_semi_structured_tensor, to_torch_semi_structured
from .sparse24 import (NMPacked, check_nm_packed, nm_index_bits, nm_index_codes, nm_indices_from_codes, pack_nm,
                       unpack_nm)

__all__ = [
    "NMPacked",
    "pack_nm",
    "unpack_nm",
    "nm_index_bits",
    "nm_index_codes",
    "nm_indices_from_codes",
    "check_nm_packed",
    "BITMAP_TILE",
    "BitmapPacked",
    "pack_bitmap",
    "unpack_bitmap",
    "bitmap_row_counts",
    "check_bitmap_packed",
    "to_torch_semi_structured",
    "from_torch_semi_structured",
    "to_sparse_semi_structured_tensor",
]
