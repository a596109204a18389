"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL):
A Missing Secret Sauce for Pruning LLMs to High Sparsity", Sec. 3).

Each decoder block gets its own sparsity: blocks with more *outlier* weights keep more of them. The outlier
ratio D_l of block l is the fraction of the block's Wanda scores |W_ij| * ||X_j|| (all its linear layers
together) that exceed ``m`` times the block's mean score. The ratios are rescaled linearly to
[0, 2 * lam], shifted so their mean is the target density (1 - S), and block l gets sparsity
1 - density_l: the block sparsities span 2 * lam and their mean is exactly S (the span is centred on S
only when the ratios are spread symmetrically).

The scores come from a dense calibration pass (each block sees the dense outputs of the blocks before it).
Unstructured sparsity only: an N:M pattern fixes every block's sparsity at N/M.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .calibrate import InMemoryLayers, collect_input_stats, require_stats, run_layer
from .models import find_linears, linear_weight

__all__ = ["outlier_ratios", "owl_sparsities"]


@torch.no_grad()
def outlier_ratios(model: nn.Module, layers: nn.ModuleList, calib_windows: torch.Tensor, m: float = 5.0,
                   progress: bool = False, layer_io=None) -> list[float]:
    """Per block, the fraction of Wanda scores above ``m`` times the block's mean score (dense model).

    layer_io: as in ``sparsekit.prune.prune_model``, for blocks that live on disk (``sparsekit.offload``)."""
    io = layer_io if layer_io is not None else InMemoryLayers(model, layers)
    inputs = io.capture(calib_windows)
    scratch = torch.empty_like(inputs.hidden)
    ratios = []
    for i, layer in enumerate(tqdm(layers, desc="owl ratios", unit="layer", disable=not progress)):
        io.load(i)
        linears = find_linears(layer)
        stats = collect_input_stats(layer, linears, inputs, scratch)
        require_stats(stats, linears, i)
        scores = [ops.wanda_score(linear_weight(lin), stats[name].sq_norm).flatten()
                  for name, lin in linears.items()]
        total = sum(s.numel() for s in scores)
        mean = sum(float(s.double().sum()) for s in scores) / total
        count = sum(int((s > m * mean).sum()) for s in scores)
        ratios.append(count / total)
        run_layer(layer, inputs, scratch)
        inputs.hidden, scratch = scratch, inputs.hidden
        io.done(i)
    return ratios


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Map outlier ratios to per-block sparsities spanning ``2 * lam`` with mean ``target``.

    More outliers -> lower sparsity. Raises ValueError if a block's sparsity would leave [0, 1).
    """
    if not (0.0 <= target < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {target}")
    if lam < 0:
        raise ValueError(f"OWL lambda must be >= 0, got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1.0 - target)
    sparsity = (1.0 - density).tolist()
    bad = [(i, s) for i, s in enumerate(sparsity) if not (0.0 <= s < 1.0)]
    if bad:
        i, s = bad[0]
        raise ValueError(f"OWL gives block {i} sparsity {s:.3f}, outside [0, 1): lower --owl-lambda "
                         f"(now {lam}) or the target sparsity {target}")
    return sparsity
