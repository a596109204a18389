"""Perplexity of a causal LM over token windows.

Perplexity = exp(mean negative log-likelihood over every predicted token): each window of L tokens
predicts its last L - 1 tokens from the ones before; no context crosses a window boundary. This is the
evaluation of the Wanda and SparseGPT papers (non-overlapping windows of ``seqlen`` tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "window_nll"]


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "eval",
               device: torch.device | None = None) -> tuple[float, int]:
    """Sum of NLL (float64) and number of predicted tokens over ``windows`` (n, L) int64.

    device: where the token ids go (default: the device of the model's first parameter)."""
    device = device if device is not None else next(model.parameters()).device
    total, count = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="win", disable=not progress,
               leave=False)
    for i in bar:
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # float32 for the loss whatever the model's dtype: bf16 log-softmax over 49k classes loses digits.
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "eval"
               ) -> float:
    """exp(mean NLL over every predicted token of every window). windows: (n, L) int64."""
    total, count = window_nll(model, windows, batch_size, progress, desc)
    return math.exp(total / count)
