"""Bitmap weights for unstructured sparsity: a bit per weight, and the non-zeros packed.

Layout of ``BitmapPacked`` for W: (out_features, in_features), T = ceil(in_features / 64) tiles per row:

* ``bitmask``     (out_features, T) int64. Bit b (value 1 << b, bit 63 is the sign bit) of bitmask[r, t] is
  set iff W[r, 64 * t + b] != 0. Bits past in_features are 0. int64 holds the uint64 bit pattern because
  torch's uint64 lacks most CPU ops.
* ``values``      (nnz,) W's dtype: the non-zeros in row-major order (tile after tile, bit after bit).
* ``row_offsets`` (out_features + 1,) int64: row r's non-zeros are values[row_offsets[r]:row_offsets[r+1]].
  A kernel that walks a row finds each tile's values by popcounts of the previous tiles of that row only.

At 70% sparsity an fp32 weight moves 0.3 * 4 + 1/8 = 1.325 bytes per dense weight instead of 4, a bf16 one
0.725 instead of 2. -0.0 counts as zero and comes back as +0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BITMAP_TILE", "BitmapPacked", "pack_bitmap", "unpack_bitmap", "bitmap_row_counts", "check_bitmap_packed"]

# Columns per tile: one 64-bit mask word.
BITMAP_TILE = 64


@dataclass(frozen=True)
class BitmapPacked:
    """An unstructured sparse weight (see the module docstring for the layout)."""

    bitmask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    shape: tuple[int, int]


def _bit_weights(device) -> torch.Tensor:
    return torch.ones(BITMAP_TILE, dtype=torch.int64, device=device) << torch.arange(
        BITMAP_TILE, dtype=torch.int64, device=device
    )


def pack_bitmap(weight: torch.Tensor) -> BitmapPacked:
    """Pack W: (out, in) floating into bitmask + non-zeros + row offsets. Any sparsity, any in_features."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating, got dtype {weight.dtype}")
    rows, cols = weight.shape
    tiles = -(-cols // BITMAP_TILE)
    nonzero = weight != 0
    padded = nonzero.new_zeros(rows, tiles * BITMAP_TILE)
    padded[:, :cols] = nonzero
    # Distinct powers of two add without carries, so the int64 sum is the OR of the bits (bit 63 included).
    bitmask = (padded.reshape(rows, tiles, BITMAP_TILE).to(torch.int64) * _bit_weights(weight.device)).sum(-1)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
    row_offsets[1:] = nonzero.sum(dim=1).cumsum(0)
    return BitmapPacked(bitmask.contiguous(), weight[nonzero].contiguous(), row_offsets, (rows, cols))


def unpack_bitmap(packed: BitmapPacked) -> torch.Tensor:
    """The dense (out, in) weight of ``packed``, its values' dtype and device."""
    rows, cols = packed.shape
    bits = (packed.bitmask.unsqueeze(-1) >> torch.arange(BITMAP_TILE, device=packed.bitmask.device)) & 1
    mask = bits.reshape(rows, packed.bitmask.shape[1] * BITMAP_TILE)[:, :cols].bool()  # rows may be 0
    dense = packed.values.new_zeros(rows, cols)
    dense[mask] = packed.values
    return dense


_BYTE_POPCOUNT = [bin(i).count("1") for i in range(256)]


def bitmap_row_counts(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bits set per row of ``bitmask`` (int64 (out, T)) in columns below ``in_features``: (out,) int64."""
    words = bitmask.contiguous()
    if in_features % BITMAP_TILE and words.shape[1]:
        words = words.clone()
        words[:, -1] &= (1 << (in_features % BITMAP_TILE)) - 1
    lut = torch.tensor(_BYTE_POPCOUNT, dtype=torch.int64, device=words.device)
    return lut[words.view(torch.uint8).to(torch.int32)].reshape(words.shape[0], -1).sum(1)


def check_bitmap_packed(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                        in_features: int, what: str = "bitmap weight") -> None:
    """Raise ValueError, naming the first inconsistency, unless ``row_offsets`` runs from 0 to values.numel()
    and gives every row exactly as many values as its bits below in_features, with no bit set past them.

    The kernels check these per row on every call, but only the CPU one raises (the CUDA kernels assert on the
    device, the Triton kernel writes NaN rows); packers produce them consistent, so this is for what comes from
    outside, a checkpoint: one clear error before any kernel runs.
    O(out * T) on the mask, once, not per call."""
    if bitmask.dim() != 2 or bitmask.dtype != torch.int64:
        raise ValueError(f"{what}: bitmask must be a 2-D int64 tensor (out, tiles), got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    if row_offsets.dim() != 1 or row_offsets.is_floating_point() or row_offsets.dtype == torch.bool:
        raise ValueError(f"{what}: row_offsets must be a 1-D integer tensor, got {row_offsets.dtype} "
                         f"{tuple(row_offsets.shape)}")
    out, tiles = bitmask.shape
    if tiles != -(-in_features // BITMAP_TILE) or row_offsets.shape != (out + 1,):
        raise ValueError(f"{what}: bitmask {tuple(bitmask.shape)} and row_offsets {tuple(row_offsets.shape)} do "
                         f"not fit {out} rows of {in_features} columns")
    offsets = row_offsets.to(torch.int64)
    nnz = values.numel()
    if int(offsets[0]) != 0 or int(offsets[-1]) != nnz:
        raise ValueError(f"{what}: row_offsets must run from 0 to the number of values ({nnz}), got "
                         f"{int(offsets[0])} .. {int(offsets[-1])}")
    if in_features % BITMAP_TILE and tiles:
        stray = (bitmask[:, -1] & ~((1 << (in_features % BITMAP_TILE)) - 1)) != 0
        if bool(stray.any()):
            row = int(stray.nonzero()[0, 0])
            raise ValueError(f"{what}: row {row} has bits set past in_features={in_features}")
    counts = bitmap_row_counts(bitmask, in_features)
    bad = (offsets[1:] - offsets[:-1]) != counts
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what}: row {row} has {int(counts[row])} bits set but row_offsets gives it values "
                         f"{int(offsets[row])} .. {int(offsets[row + 1])}")
