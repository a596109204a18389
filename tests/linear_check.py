"""Tolerance for sparse-linear kernels: error against the exact product, bounded by the dtype."""

import pytest
import torch


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


def set_isa(isa, monkeypatch):
    """Run the CPU C++ kernels on one ISA path: "auto" (what the CPU has), "vbmi2" (no AVX512-BITALG paths),
    "avx512" (the float32-lane path) or "scalar" (the portable one), through SPARSEKIT_CPU_ISA; skips where the
    C++ extension is not loaded."""
    if isa != "auto":
        import sparsekit

        if not sparsekit.backend_status()["cpu"].live:
            pytest.skip("the ISA switch only changes the C++ kernel")
        monkeypatch.setenv("SPARSEKIT_CPU_ISA", isa)
