"""Truncated SVD judged by reconstruction error against the Eckart-Young optimum; LowRankLinear."""

import pytest
import torch

from sparsekit.nn import LowRankLinear, low_rank_saves_bytes
from sparsekit.svd import optimal_relative_error, relative_error, truncated_svd, truncation_report


def decaying_stack(b, m, n, decay=0.05, seed=0):
    """Matrices with singular values exp(-decay * i): a spectrum like trained weights, not flat noise."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(b, m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(b, n, k, generator=g))
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float32)).expand(b, k)
    return (u * s.unsqueeze(1)) @ v.transpose(-1, -2)


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 80, 48), (1, 64, 64)])
@pytest.mark.parametrize("rank", [1, 8, 30])
def test_exact_is_optimal(shape, rank):
    w = torch.randn(*shape)
    u, s, v = truncated_svd(w, rank, method="exact")
    assert u.shape == (shape[0], shape[1], rank) and s.shape == (shape[0], rank) and v.shape == (shape[0], shape[2], rank)
    torch.testing.assert_close(relative_error(w, u, s, v), optimal_relative_error(w, rank), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 96, 160), (3, 160, 96)])
@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_randomized_within_two_percent_of_optimum(shape, spectrum):
    w = torch.randn(*shape) if spectrum == "flat" else decaying_stack(*shape)
    g = torch.Generator().manual_seed(1)
    u, s, v = truncated_svd(w, 16, method="randomized", oversample=10, power_iters=2, generator=g)
    report = truncation_report(w, u, s, v, 16)
    assert report.worst_ratio <= 1.02, report
    # factors are orthonormal and singular values descending
    eye = torch.eye(16).expand(shape[0], 16, 16)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(v.transpose(-1, -2) @ v, eye, atol=1e-4, rtol=0)
    assert (s[:, :-1] >= s[:, 1:]).all()


def test_randomized_without_power_iterations_is_worse_on_flat_spectra():
    """Guard: the power iterations are doing the work the 1.02 bound relies on."""
    w = torch.randn(2, 128, 256)
    g = torch.Generator().manual_seed(0)
    r0 = truncation_report(w, *truncated_svd(w, 8, oversample=2, power_iters=0, generator=g), 8).worst_ratio
    g = torch.Generator().manual_seed(0)
    r2 = truncation_report(w, *truncated_svd(w, 8, oversample=2, power_iters=3, generator=g), 8).worst_ratio
    assert r2 < r0


def test_single_matrix_and_dtypes():
    w = torch.randn(40, 24, dtype=torch.float64)
    u, s, v = truncated_svd(w, 5, method="randomized")
    assert u.shape == (40, 5) and u.dtype == torch.float64
    wb = torch.randn(40, 24).bfloat16()
    u, s, v = truncated_svd(wb, 5, method="exact")
    assert u.dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    (dict(rank=0), "rank must be in"), (dict(rank=25), "rank must be in"), (dict(method="qr"), "unknown method"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        truncated_svd(torch.randn(30, 24), **{"rank": 4, **bad})
    with pytest.raises(ValueError, match="must be \\(m, n\\)"):
        truncated_svd(torch.randn(30), 4)


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_matches_truncated_dense(bias):
    lin = torch.nn.Linear(64, 48, bias=bias)
    lr = LowRankLinear.from_linear(lin, 8)
    x = torch.randn(2, 5, 64)
    u, s, v = truncated_svd(lin.weight.detach(), 8, method="exact")
    w_r = (u * s) @ v.t()
    want = torch.nn.functional.linear(x, w_r, lin.bias)
    torch.testing.assert_close(lr(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lr.dense_weight(), w_r, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in lr.parameters()) < sum(p.numel() for p in lin.parameters())


def test_low_rank_linear_refuses_ranks_that_save_nothing():
    assert low_rank_saves_bytes(48, 64, 27) and not low_rank_saves_bytes(48, 64, 28)
    with pytest.raises(ValueError, match="keep it dense"):
        LowRankLinear.from_linear(torch.nn.Linear(64, 48), 28)
    with pytest.raises(ValueError, match="features in the last dim"):
        LowRankLinear.from_linear(torch.nn.Linear(64, 48), 4)(torch.randn(3, 63))
