"""SparseGPT (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1): prune a linear layer and update its remaining weights to compensate, using the
inverse Hessian of the layer-wise reconstruction loss.

For a weight W (out, in) and calibration inputs X (tokens, in), H = 2/n * X^T X. Columns are processed left
to right in blocks of ``blocksize``; within a block, for unstructured sparsity the mask is chosen once per
block over all its weights by the saliency w^2 / [H^-1]_jj^2 (exactly ``int(numel * s)`` of the block
pruned, stable ranking), and for N:M every M columns by the same saliency (N lowest of each group of M in
each row). Each column's pruning error is spread onto the not-yet-processed columns through the upper
Cholesky factor of H^-1 (the OBS update), lazily per block.

Not done here: joint quantization (the paper's GPTQ variant), and per-row masks for unstructured sparsity
(the paper, and this code, select within a block across rows).
"""

from __future__ import annotations

import warnings

import torch

from . import ops

__all__ = ["SparseGPTError", "prepare_hessian_inverse", "sparsegpt_prune_"]


class SparseGPTError(RuntimeError):
    """The Hessian could not be made positive definite."""


def prepare_hessian_inverse(xtx: torch.Tensor, tokens: int, weight: torch.Tensor, percdamp: float = 0.01,
                            max_tries: int = 8) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, with H = 2/tokens * xtx; zeroes dead columns of ``weight``.

    xtx: (in, in) float32 sum of x^T x. Dead input channels (H_jj == 0: never active in calibration) get
    H_jj = 1 and their weights set to 0. Damping starts at ``percdamp * mean(diag H)`` and, if a Cholesky
    factorisation fails, is raised tenfold with a warning, up to ``max_tries`` times.
    """
    if tokens <= 0:
        raise SparseGPTError("no calibration tokens reached this layer")
    # float64: the inverse of an ill-conditioned H in fp32 drifts. Memory: at most three (in, in) float64
    # matrices live at once (H, its factor, the inverse), each 8 * in^2 bytes (134 MB at in = 4096); the
    # damping is written on H's diagonal in place rather than adding a damped copy and an identity.
    if not bool(torch.isfinite(xtx).all()):
        raise SparseGPTError("the calibration statistics (X^T X) hold inf or NaN: the layer's inputs overflowed "
                             "(a float16 model? calibrate in float32 or bfloat16)")
    h = xtx.to(torch.float64, copy=True).mul_(2.0 / tokens)
    diag = torch.diagonal(h)
    dead = diag == 0
    if dead.any():
        h[dead, dead] = 1.0
        weight[:, dead] = 0
    diag0 = torch.diagonal(h).clone()
    damp = percdamp * float(diag0.mean())
    for attempt in range(max_tries):
        torch.diagonal(h).copy_(diag0 + damp)  # == (H + damp * I) exactly
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info2) == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32)
        new_damp = damp * 10 if damp > 0 else 1e-6 * float(diag0.mean())  # relative to H's scale
        warnings.warn(f"SparseGPT: Hessian not positive definite with damping {damp:.3g}; retrying with "
                      f"{new_damp:.3g}", RuntimeWarning, stacklevel=2)
        damp = new_damp
    raise SparseGPTError(f"Hessian not positive definite even with damping {damp:.3g}")


@torch.no_grad()
def sparsegpt_prune_(weight: torch.Tensor, xtx: torch.Tensor, tokens: int, sparsity: float,
                     pattern: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01
                     ) -> torch.Tensor:
    """Prune ``weight`` (out, in) in place with SparseGPT; returns the keep-mask (bool, True = kept).

    xtx: (in, in) float32, sum over calibration tokens of x^T x; tokens: their number. With ``pattern``
    (N, M), N of every M consecutive input weights of each row are zeroed and ``sparsity`` must be N/M.
    The update is computed in float32 and written back in ``weight``'s dtype.
    """
    rows, cols = weight.shape
    if xtx.shape != (cols, cols):
        raise ValueError(f"xtx must be ({cols}, {cols}) for weight {tuple(weight.shape)}, got {tuple(xtx.shape)}")
    if pattern is not None and cols % pattern[1]:
        raise ValueError(f"N:M pattern {pattern[0]}:{pattern[1]} does not divide in_features={cols}")
    if pattern is not None and blocksize % pattern[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern[1]}")
    w = weight.detach().to(torch.float32).clone()
    hinv = prepare_hessian_inverse(xtx.to(w.device), tokens, w, percdamp)
    keep = torch.ones((rows, cols), dtype=torch.bool, device=w.device)

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        d = torch.diagonal(hinv_blk)
        if pattern is None:
            keep_blk = ops.matrix_prune_mask((w_blk / d) ** 2, sparsity)
        else:
            keep_blk = torch.ones_like(w_blk, dtype=torch.bool)
        # Per column four kernels (a GPU runs this loop launch-bound: 11008 columns for a Llama-2-7B
        # down_proj): the error e = w_j / d_j where pruned, 0 where kept, written straight into err_blk; then
        # the rank-1 OBS update of the columns from j on. Pruned weights are left at their rounding residue
        # (w_j - e * d_j) here and zeroed once per block below; no later column reads them.
        for j in range(b1 - b0):
            if pattern is not None and j % pattern[1] == 0:
                m = pattern[1]
                saliency = (w_blk[:, j: j + m] / d[j: j + m]) ** 2
                keep_blk[:, j: j + m] = ops.nm_mask(saliency, pattern[0], m)
            e = err_blk[:, j]
            torch.div(w_blk[:, j], d[j], out=e)
            e.masked_fill_(keep_blk[:, j], 0.0)
            w_blk[:, j:].sub_(e.unsqueeze(1) * hinv_blk[j, j:].unsqueeze(0))
        w[:, b0:b1] = w_blk.masked_fill_(~keep_blk, 0.0)
        keep[:, b0:b1] = keep_blk
        w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]

    if not torch.isfinite(w).all():
        raise SparseGPTError("SparseGPT produced non-finite weights")
    out = w.to(weight.dtype)  # pruned weights are exact zeros already (masked_fill_ per block)
    if not torch.isfinite(out).all():
        raise SparseGPTError(f"SparseGPT's updated weights do not fit {weight.dtype}: the OBS updates took some past "
                             f"its range (largest |w| {float(w.abs().max()):.3g}); prune in float32 or bfloat16")
    weight.copy_(out)
    return keep
