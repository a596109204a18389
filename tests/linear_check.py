"""Tolerance for sparse-linear kernels: error against the exact product, bounded by the dtype; and the pruned
nn.Linear layers the SparseLinear tests pack."""

import pytest
import torch
from torch import nn


def assert_linear_close(got, x, weight, bias):
    """got vs the exact x @ W^T + b (float64 on the same low-precision inputs); tolerance from the dtype."""
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        scale = scale + bias.double().abs()
    assert got.dtype == x.dtype and got.shape == exact.shape
    if x.dtype == torch.float32:
        bound = 1e-5 * scale + 1e-30
        err = (got.double() - exact).abs()
    else:
        rounded = exact.to(x.dtype).double()
        bound = 2.0**-7 * rounded.abs() + 1e-5 * scale + 1e-30
        err = (got.double() - rounded).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound"


def pruned_linear(in_f, out_f, fmt, bias=True, dtype=torch.float32, sparsity=0.5):
    """An nn.Linear pruned to ``fmt`` ("N:M" by magnitude, or "bitmap": ``sparsity`` of each row), bias random."""
    import sparsekit.ops

    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        w = lin.weight
        if fmt == "bitmap":
            keep = sparsekit.ops.rowwise_prune_mask(w.abs(), round(sparsity * in_f))
        else:
            n, m = (int(v) for v in fmt.split(":"))
            keep = sparsekit.ops.nm_mask(w.abs(), n, m)
        w.mul_(keep)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def set_isa(isa, monkeypatch):
    """Run the CPU C++ kernels on one ISA path: "auto" (what the CPU has), "vbmi2" (no AVX512-BITALG paths),
    "avx512" (the float32-lane path) or "scalar" (the portable one), through SPARSEKIT_CPU_ISA; skips where the
    C++ extension is not loaded."""
    if isa != "auto":
        import sparsekit

        if not sparsekit.backend_status()["cpu"].live:
            pytest.skip("the ISA switch only changes the C++ kernel")
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)


def bad_row_offsets_cases(values, offsets):
    """Bad row_offsets for a bitmap weight of at least 6 rows: (label, values, row_offsets, the output features
    they break). The Triton kernel gives NaN there (and the host emulation of the CUDA kernel, whose device
    asserts stop the kernel instead); every other output feature must equal the run with the good row_offsets."""
    out_f, nnz = offsets.numel() - 1, values.numel()
    shifted = offsets.clone()
    shifted[3] += 1  # row 2 one value too many, row 3 one too few
    first = offsets.clone()
    first[0] = 1  # row 0 starts past value 0 (and is one short)
    late = offsets + 1  # every row one value later: each takes its popcount, but row 0 skips value 0
    late[-1] = nnz  # ... and the last row, one short, still ends at nnz
    far = offsets.clone()
    far[5] = 1 << 40  # rows 4 and 5 point far past values: nothing may be read there
    negative = offsets.clone()
    negative[2] = -8  # rows 1 and 2 point before values
    extra = torch.cat([values, values[:1]])  # one value more than the bits take: the last row must end at nnz
    return [("shifted", values, shifted, {2, 3}), ("first", values, first, {0}),
            ("late", torch.cat([values[:1], values]), late, {0, out_f - 1}), ("far", values, far, {4, 5}),
            ("negative", values, negative, {1, 2}), ("extra", extra, offsets, {out_f - 1})]
