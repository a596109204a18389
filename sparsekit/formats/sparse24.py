"""N:M packed weights: the kept values of every group of M consecutive input weights and their positions.

Convention (as ``sparsekit.ops.nm_mask``, Wanda and SparseGPT): "N:M" means N ZEROS in every M consecutive
weights of a row, so each group keeps K = M - N values. 2:4 keeps 2 of 4.

Layout of ``NMPacked`` for a weight W: (out_features, in_features), in_features % M == 0, G = in_features / M:

* ``values``  (out_features, G * K), W's dtype. Row r holds, group after group, the K kept values of each
  group in increasing column order.
* ``indices`` (out_features, G * K) uint8, the position (0..M-1) of each kept value in its group, increasing
  within a group. W[r, g * M + indices[r, g * K + k]] == values[r, g * K + k].

A group with more than N zeros is stored as is: some of its K "kept" values are zeros (the lowest-index zero
positions fill the slots). A group with fewer than N zeros does not fit and ``pack_nm`` raises.

Index codes (``nm_index_codes``), what the kernels read: the indices of a row packed little-endian into
bytes, b = 2 bits each when M <= 4 and b = 4 bits when M <= 16. Index j of row r sits in byte
codes[r, (j * b) // 8] at bit (j * b) % 8; the last byte of a row is zero-padded. For 2:4 this is
0.25 byte per kept value (16 indices in one little-endian uint32, index j at bits 2j..2j+1), so a bf16
2:4 weight moves 1.125 bytes per dense weight instead of 2, and an fp32 one 2.125 instead of 4.

torch's semi-structured (CUTLASS) layout for 2:4 float16/bfloat16: ``sparsekit.formats.semi_structured``.
Not done: cuSPARSELt's compressed layout (``SparseLinear`` builds that with ``torch._cslt_compress`` on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import as_int

__all__ = ["NMPacked", "pack_nm", "unpack_nm", "nm_index_bits", "nm_index_codes", "nm_indices_from_codes",
           "check_nm_packed"]

# Index codes are 2 or 4 bits wide, so a group position must fit in 4 bits.
MAX_GROUP_SIZE = 16


@dataclass(frozen=True)
class NMPacked:
    """An N:M sparse weight (see the module docstring for the layout).

    values: (out, in / m * (m - n)) the weight's dtype; indices: same shape, uint8, position in the group;
    shape: (out, in) of the dense weight; n zeros in every m.
    """

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, int]
    n: int
    m: int

    @property
    def kept_per_group(self) -> int:
        return self.m - self.n


def _check_pattern(n: int, m: int) -> None:
    for name, v in (("N", n), ("M", m)):
        if not isinstance(v, int):
            raise ValueError(f"N:M packing needs N and M as Python ints, got {name}={v!r} ({type(v).__name__}); "
                             f"pass int({name})")
    if not (1 <= m <= MAX_GROUP_SIZE):
        raise ValueError(f"N:M packing needs 1 <= M <= {MAX_GROUP_SIZE}, got M={m}")
    if not (0 <= n < m):
        raise ValueError(f"N:M packing needs 0 <= N < M, got {n}:{m}")


def pack_nm(weight: torch.Tensor, n: int, m: int) -> NMPacked:
    """Pack W: (out, in) floating, with at least n zeros in every m consecutive weights of a row.

    Raises ValueError if in % m != 0, or naming the first group (row-major order) with more than m - n
    non-zeros. -0.0 counts as a zero and may come back as +0.0 (torch.equal treats them as equal).
    """
    _check_pattern(n, m)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating, got dtype {weight.dtype}")
    rows, cols = weight.shape
    if cols % m != 0:
        raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features {cols} (shape {(rows, cols)})")
    kept = m - n
    groups = weight.reshape(rows, cols // m, m)
    nonzero = groups != 0
    count = nonzero.sum(dim=-1)
    bad = (count > kept).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(
            f"weight is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} hold {int(count[r, g])} "
            f"non-zeros, at most {kept} allowed (first bad group of {bad.shape[0]})"
        )
    # Rank positions: non-zeros first, then zeros, each in column order; keep the first K, sorted by column.
    pos = torch.arange(m, device=weight.device)
    rank_key = (~nonzero).to(torch.int64) * m + pos
    chosen = torch.sort(torch.argsort(rank_key, dim=-1)[..., :kept], dim=-1).values
    values = torch.gather(groups, -1, chosen).reshape(rows, cols // m * kept)
    indices = chosen.to(torch.uint8).reshape(rows, cols // m * kept)
    return NMPacked(values.contiguous(), indices.contiguous(), (rows, cols), n, m)


def unpack_nm(packed: NMPacked) -> torch.Tensor:
    """The dense (out, in) weight of ``packed``, its values' dtype and device."""
    rows, cols = packed.shape
    m, kept = packed.m, packed.kept_per_group
    dense = packed.values.new_zeros(rows, cols // m, m)
    groups = cols // m
    dense.scatter_(-1, packed.indices.to(torch.int64).reshape(rows, groups, kept),
                   packed.values.reshape(rows, groups, kept))
    return dense.reshape(rows, cols)


def nm_index_bits(m: int) -> int:
    """Width in bits of one index code for group size m: 2 for m <= 4, else 4."""
    if not 1 <= m <= MAX_GROUP_SIZE:
        raise ValueError(f"index codes need 1 <= M <= {MAX_GROUP_SIZE}, got M={m}")
    return 2 if m <= 4 else 4


def nm_index_codes(indices: torch.Tensor, m: int) -> torch.Tensor:
    """Pack uint8 indices (out, kept_total) into the kernels' codes: (out, ceil(kept_total * b / 8)) uint8."""
    bits = nm_index_bits(m)
    per_byte = 8 // bits
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D (out, kept), got shape {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor (uint8 positions), got {indices.dtype}")
    rows, count = indices.shape
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m):
        bad = ((indices.to(torch.int64) < 0) | (indices.to(torch.int64) >= m)).nonzero()[0].tolist()
        raise ValueError(f"index {int(indices[bad[0], bad[1]])} at {tuple(bad)} is not a position in a group of "
                         f"m={m} (0 .. {m - 1}): it would not fit its {bits}-bit code")
    width = -(-count // per_byte)
    padded = indices.new_zeros(rows, width * per_byte, dtype=torch.int32)
    padded[:, :count] = indices.to(torch.int32)
    shifts = torch.arange(per_byte, device=indices.device, dtype=torch.int32) * bits
    return (padded.reshape(rows, width, per_byte) << shifts).sum(dim=-1).to(torch.uint8)


def nm_indices_from_codes(codes: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Inverse of ``nm_index_codes``: (out, count) uint8 indices from (out, width) uint8 codes."""
    bits = nm_index_bits(m)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    unpacked = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return unpacked.reshape(codes.shape[0], codes.shape[1] * per_byte)[:, :count].to(torch.uint8)


def check_nm_packed(values: torch.Tensor, index_codes: torch.Tensor, n: int, m: int, in_features: int,
                    what: str = "N:M weight") -> None:
    """Raise ValueError, naming the first bad group, unless ``values`` / ``index_codes`` are an N:M packed weight
    of in_features columns whose every group holds K = M - N distinct positions below M.

    ``pack_nm`` + ``nm_index_codes`` always make such codes; this is for what comes from outside (a checkpoint,
    hand-built buffers). The kernels do not check per call that a group's positions are distinct (at a repeated
    position the CPU streamed kernels and the GPU kernels add both values' products, the decode paths keep the
    last value): in the CPU kernels' loops such a check cost up to 10% at M = 1-8 on one thread. They do raise on a
    position >= M, which would read outside the group. O(values) once, not per call."""
    _check_pattern(n, m)
    kept = m - n
    in_features = as_int(in_features, f"{what}: in_features")
    if in_features < 0 or in_features % m:
        raise ValueError(f"{what}: M={m} does not divide in_features={in_features}")
    groups = in_features // m
    if values.dim() != 2 or values.shape[1] != groups * kept:
        raise ValueError(f"{what}: values must be (out, {groups * kept}) for {n}:{m} over {in_features} columns, "
                         f"got {tuple(values.shape)}")
    rows = values.shape[0]
    width = -(-groups * kept * nm_index_bits(m) // 8)
    if index_codes.dtype != torch.uint8 or tuple(index_codes.shape) != (rows, width):
        raise ValueError(f"{what}: index_codes must be uint8 ({rows}, {width}), got {index_codes.dtype} "
                         f"{tuple(index_codes.shape)}")
    if rows == 0 or groups == 0 or kept <= 0:
        return
    pos = nm_indices_from_codes(index_codes, m, groups * kept).to(torch.int64).reshape(rows, groups, kept)
    outside = pos >= m
    if bool(outside.any()):
        r, g, k = (int(i) for i in outside.nonzero()[0])
        raise ValueError(f"{what}: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) holds position "
                         f"{int(pos[r, g, k])}, not below M={m}")
    ordered = pos.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
    if bool(repeated.any()):
        r, g = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(f"{what}: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) repeats a position: "
                         f"{pos[r, g].tolist()} (the {kept} kept values of a group need distinct positions)")
