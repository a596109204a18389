"""Batched truncated SVD, and how far a truncation is from the best possible one.

``truncated_svd(W, rank)`` takes a (B, m, n) stack (or one (m, n) matrix) and returns U (B, m, r),
S (B, r), V (B, n, r) with W ~= U @ diag(S) @ V^T.

* ``method="exact"``: batched ``torch.linalg.svd``, truncated. The reference.
* ``method="randomized"``: the Halko-Martinsson-Tropp range finder (Halko, Martinsson and Tropp 2011,
  "Finding Structure with Randomness", Algorithms 4.3/4.4 and 5.1): sketch Y = W @ Omega with a Gaussian
  Omega of ``rank + oversample`` columns, ``power_iters`` rounds of subspace iteration (re-orthonormalised
  by QR after every product, which keeps small singular values from drowning in rounding), then an exact
  SVD of the small (rank + oversample, n) projection Q^T W. Everything is batched GEMMs and batched QR
  over the stack: no Python loop over matrices.

The quality measure is the one Eckart-Young makes meaningful: the relative Frobenius error
||W - U S V^T||_F / ||W||_F, against the optimum sqrt(sum_{i>r} sigma_i^2) / ||W||_F from the exact
singular values. Factors themselves are not comparable (signs and order within repeated singular values
are arbitrary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["truncated_svd", "reconstruct", "relative_error", "optimal_relative_error", "TruncationReport",
           "truncation_report"]


def _as_stack(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if w.dim() == 2:
        return w.unsqueeze(0), True
    if w.dim() == 3:
        return w, False
    raise ValueError(f"W must be (m, n) or a (B, m, n) stack, got shape {tuple(w.shape)}")


def truncated_svd(w: torch.Tensor, rank: int, method: str = "randomized", oversample: int = 10,
                  power_iters: int = 2, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of each matrix of ``w`` ((B, m, n) or (m, n), floating).

    Returns U (B, m, r), S (B, r) descending, V (B, n, r) (no batch dim if ``w`` was 2-D), in ``w``'s dtype;
    the work is done in float32 at least (float64 stays float64).
    """
    stack, squeeze = _as_stack(w)
    if not stack.is_floating_point():
        raise ValueError(f"W must be floating, got {stack.dtype}")
    b, m, n = stack.shape
    if not (1 <= rank <= min(m, n)):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for {m}x{n} matrices, got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("oversample and power_iters must be >= 0")
    work_dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
    a = stack.to(work_dtype)

    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].transpose(-1, -2)
    elif method == "randomized":
        u, s, v = _randomized(a, rank, oversample, power_iters, generator)
    else:
        raise ValueError(f"unknown method '{method}', choose exact or randomized")
    out = tuple(t.to(stack.dtype) for t in (u, s, v))
    return tuple(t.squeeze(0) for t in out) if squeeze else out


def _randomized(a: torch.Tensor, rank: int, oversample: int, power_iters: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m, n = a.shape
    k = min(rank + oversample, m, n)
    transpose = m < n  # sketch the smaller side: the range finder then works on a tall matrix
    if transpose:
        a = a.transpose(-1, -2)
        m, n = n, m
    omega = torch.randn(b, n, k, dtype=a.dtype, device=a.device, generator=generator)
    q, _ = torch.linalg.qr(a @ omega)  # (b, m, k)
    at = a.transpose(-1, -2)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(at @ q)  # (b, n, k)
        q, _ = torch.linalg.qr(a @ z)  # (b, m, k)
    small = q.transpose(-1, -2) @ a  # (b, k, n)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_small[..., :rank]
    s = s[..., :rank]
    v = vh[..., :rank, :].transpose(-1, -2)
    if transpose:
        u, v = v, u
    return u, s, v


def reconstruct(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U diag(S) V^T, batched."""
    return (u * s.unsqueeze(-2)) @ v.transpose(-1, -2)


def relative_error(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||W - U S V^T||_F / ||W||_F per matrix (float64)."""
    stack, _ = _as_stack(w)
    if u.dim() == 2:
        u, s, v = u.unsqueeze(0), s.unsqueeze(0), v.unsqueeze(0)
    a = stack.double()
    diff = a - reconstruct(u.double(), s.double(), v.double())
    return torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(a)


def optimal_relative_error(w: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young optimum of ``relative_error`` at ``rank``, from the exact singular values (float64)."""
    stack, _ = _as_stack(w)
    sv = torch.linalg.svdvals(stack.double())
    return sv[..., rank:].pow(2).sum(-1).sqrt() / sv.pow(2).sum(-1).sqrt()


@dataclass
class TruncationReport:
    error: list[float]  # relative Frobenius error per matrix
    optimum: list[float]  # Eckart-Young optimum per matrix
    worst_ratio: float  # max over matrices of error / optimum


def truncation_report(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int
                      ) -> TruncationReport:
    err = relative_error(w, u, s, v)
    opt = optimal_relative_error(w, rank)
    ratio = torch.where(opt > 0, err / opt, torch.where(err > 0, torch.inf, torch.ones_like(err)))
    return TruncationReport(err.tolist(), opt.tolist(), float(ratio.max()))
