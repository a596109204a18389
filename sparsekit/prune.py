"""Choose and apply pruning masks, layer by layer.

Methods (mask = bool, True = keep; see ``sparsekit.ops`` for the tie rule):

* ``magnitude``: unstructured, one |W| threshold per matrix: the ``int(numel * s)`` smallest |W_ij| of the
  whole matrix are pruned. N:M: the N smallest |W| of every M consecutive input columns of each row.
* ``sparsegpt`` (Frantar and Alistarh 2023): see ``sparsekit.sparsegpt``; masks from the inverse Hessian of
  the layer's reconstruction loss, remaining weights updated to compensate.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", eq. 1): score
  S_ij = |W_ij| * ||X_j||_2 over all calibration tokens. Unstructured: the ``int(in_features * s)`` lowest
  scores **of each output row** are pruned (the paper's per-output comparison group, not the whole layer).
  N:M: the N lowest scores of every M consecutive input columns of each row.

N:M means N zeros in every M consecutive weights along the input dimension (the Wanda/SparseGPT
references' convention; 2:4 and 4:8 read the same either way), so its sparsity is exactly N/M.

Only the linear layers inside decoder blocks are pruned: embeddings and the LM head never are.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .calibrate import InMemoryLayers, LinearStats, collect_input_stats, require_stats, run_layer
from .models import find_decoder_layers, find_linears, linear_weight

__all__ = [
    "METHODS",
    "PruneSpec",
    "LinearReport",
    "PruneReport",
    "parse_pattern",
    "magnitude_mask",
    "wanda_mask",
    "prune_model",
]


def _check_pattern(n: int, m: int) -> None:
    if m < 1 or not (0 < n < m):
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4). None -> None. Raises ValueError naming the problem."""
    if text is None:
        return None
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must look like N:M (for example 2:4), got '{text}'")
    n, m = int(parts[0]), int(parts[1])
    _check_pattern(n, m)
    return n, m


@dataclass(frozen=True)
class PruneSpec:
    """What to prune. ``sparsity`` in [0, 1); with a pattern N:M it must be N/M (or None, meaning N/M)."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    percdamp: float = 0.01  # SparseGPT: damping as a fraction of mean(diag H)
    profile: str = "uniform"  # or "owl": per-block sparsities from outlier ratios (sparsekit.owl)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m times its block's mean score
    owl_lambda: float = 0.08  # OWL: block sparsities span 2 * owl_lambda around a mean of sparsity

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}', choose one of {', '.join(METHODS)}")
        if self.pattern is not None:
            n, m = self.pattern
            _check_pattern(n, m)
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", n / m)
            elif abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(f"pattern {n}:{m} prunes exactly {n / m:g} of the weights; "
                                 f"--sparsity {self.sparsity:g} contradicts it (omit --sparsity or pass {n / m:g})")
        if self.sparsity is None:
            raise ValueError("give a sparsity (in [0, 1)) or an N:M pattern")
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        # --blocksize is SparseGPT's alone: other methods ignore it (its default, 128, need not be a multiple of M)
        if self.method == "sparsegpt" and (
                self.blocksize < 1 or (self.pattern is not None and self.blocksize % self.pattern[1])):
            m = f" of M={self.pattern[1]}" if self.pattern is not None else ""
            raise ValueError(f"sparsegpt's --blocksize must be a positive multiple{m}, got {self.blocksize}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"percdamp (--percdamp) must be a finite number >= 0, got {self.percdamp}")
        if not (math.isfinite(self.owl_m) and self.owl_m > 0):
            raise ValueError(f"OWL's M (--owl-m) must be a finite number > 0, got {self.owl_m}")
        if not (math.isfinite(self.owl_lambda) and 0 <= self.owl_lambda < 1):
            raise ValueError(f"OWL's lambda (--owl-lambda) must be in [0, 1), got {self.owl_lambda}")
        if self.profile not in ("uniform", "owl"):
            raise ValueError(f"unknown sparsity profile '{self.profile}', choose uniform or owl")
        if self.profile == "owl" and self.pattern is not None:
            raise ValueError("the OWL profile gives each block its own sparsity; an N:M pattern fixes it at N/M "
                             "(use OWL with unstructured sparsity)")

    @property
    def pattern_str(self) -> str:
        return "unstructured" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask by |W|. weight: (out, in). Unstructured: one threshold per matrix; N:M per group."""
    score = weight.abs()
    if pattern is not None:
        return ops.nm_mask(score, *pattern)
    return ops.matrix_prune_mask(score, sparsity)


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float,
               pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask by the Wanda score |W_ij| * ||X_j||. weight: (out, in); sq_norm: (in,) float32 sum of x^2.

    Unstructured: ``int(in * sparsity)`` lowest scores pruned in each output row. N:M: per group of M.
    """
    if pattern is None and not (0.0 <= sparsity < 1.0):  # NaN fails too
        raise ValueError(f"wanda_mask: sparsity must be in [0, 1), got {sparsity}")
    score = ops.wanda_score(weight, sq_norm.to(weight.device))
    if pattern is not None:
        return ops.nm_mask(score, *pattern)
    return ops.rowwise_prune_mask(score, int(weight.shape[1] * sparsity))


@dataclass(frozen=True)
class Method:
    name: str
    needs_calibration: bool
    needs_hessian: bool
    doc: str

    def prune_(self, weight: torch.Tensor, stats: LinearStats | None, spec: PruneSpec) -> torch.Tensor:
        """Prune ``weight`` (out, in) in place; return the keep-mask."""
        if self.name == "sparsegpt":
            from .sparsegpt import sparsegpt_prune_

            return sparsegpt_prune_(weight, stats.xtx, stats.tokens, spec.sparsity, spec.pattern,
                                    blocksize=spec.blocksize, percdamp=spec.percdamp)
        if self.name == "magnitude":
            keep = magnitude_mask(weight, spec.sparsity, spec.pattern)
        elif self.name == "wanda":
            keep = wanda_mask(weight, stats.sq_norm, spec.sparsity, spec.pattern)
        else:  # pragma: no cover
            raise AssertionError(self.name)
        weight.masked_fill_(~keep, 0)
        return keep


METHODS = {
    "magnitude": Method("magnitude", False, False, "|W|, one threshold per matrix (N:M: per group)"),
    "wanda": Method("wanda", True, False, "|W|*||X||, compared per output row (Sun et al. 2023)"),
    "sparsegpt": Method("sparsegpt", True, True,
                        "Hessian-based masks with OBS weight updates (Frantar and Alistarh 2023)"),
}


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    seconds: float
    layers: list[LinearReport] = field(default_factory=list)
    profile: str = "uniform"
    block_sparsities: list[float] = field(default_factory=list)  # target per decoder block
    outlier_ratios: list[float] = field(default_factory=list)  # OWL only

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned linear layers."""
        return sum(r.zeros for r in self.layers) / max(1, sum(r.numel for r in self.layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        for row in d["layers"]:
            row["sparsity"] = row["zeros"] / row["numel"]
        return d


def _check_prunable(layers: nn.ModuleList, spec: PruneSpec) -> list[dict[str, nn.Module]]:
    """Linears per block; fails before anything is pruned if a pattern does not fit a layer."""
    per_layer = [find_linears(layer) for layer in layers]
    if not any(per_layer):
        raise ValueError("the decoder layers hold no linear layers to prune")
    dense = _weights_outside_linears(layers[0], per_layer[0])
    if dense:
        warnings.warn(f"decoder blocks hold weight matrices that are not linear layers ({', '.join(dense[:4])}"
                      f"{', ...' if len(dense) > 4 else ''}: fused MoE experts, for example): sparsekit does not "
                      "prune them, and the report's sparsity counts only the linear layers", stacklevel=3)
    return _check_patterns(per_layer, spec)


def _weights_outside_linears(layer: nn.Module, linears: dict[str, nn.Module]) -> list[str]:
    """Names and shapes of the block's >= 2-D parameters that belong to none of its linear layers."""
    owned = {id(p) for lin in linears.values() for p in lin.parameters()}
    return [f"{name} {tuple(p.shape)}" for name, p in layer.named_parameters()
            if p.dim() >= 2 and id(p) not in owned]


def _check_patterns(per_layer: list[dict[str, nn.Module]], spec: PruneSpec) -> list[dict[str, nn.Module]]:
    if spec.pattern is not None:
        n, m = spec.pattern
        for i, linears in enumerate(per_layer):
            for name, lin in linears.items():
                width = linear_weight(lin).shape[1]
                if width % m:
                    raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={width} of "
                                     f"layer {i} '{name}'")
    return per_layer


@torch.no_grad()
def _apply(layer_idx: int, linears: dict[str, nn.Module], stats: dict[str, LinearStats] | None,
           method: Method, spec: PruneSpec, report: PruneReport) -> None:
    for name, lin in linears.items():
        w = linear_weight(lin)
        method.prune_(w, None if stats is None else stats[name], spec)
        report.layers.append(LinearReport(f"{layer_idx}.{name}", tuple(w.shape), int((w == 0).sum()), w.numel()))


def prune_model(model: nn.Module, spec: PruneSpec, calib_windows: torch.Tensor | None = None,
                progress: bool = True,
                on_layer: Callable[[int, dict[str, LinearStats]], None] | None = None,
                layer_io=None) -> PruneReport:
    """Prune every linear layer inside ``model``'s decoder blocks in place, sequentially.

    calib_windows: (nsamples, seqlen) int64 token windows, needed by methods that calibrate (wanda).
    For those, each block's statistics are collected on the outputs of the already-pruned blocks before it.
    on_layer(i, stats) is called with each block's statistics (name -> LinearStats) before it is pruned.
    layer_io: how blocks are reached (default ``InMemoryLayers``; ``sparsekit.offload`` for blocks on disk):
    ``capture(windows)`` returns the first block's inputs, ``load(i)`` materializes block i before it is used,
    ``done(i)`` is called when block i is pruned and has produced its outputs (the offload writer saves and
    drops it there), and ``reader()`` gives the access for a pass that reads blocks without writing (OWL).
    """
    training = model.training
    model.eval()  # calibration must not run dropout (masks would change from run to run)
    try:
        return _prune_model(model, spec, calib_windows, progress, on_layer, layer_io)
    finally:
        model.train(training)


def _prune_model(model, spec, calib_windows, progress, on_layer, layer_io) -> PruneReport:
    method = METHODS[spec.method]
    layers = find_decoder_layers(model)
    per_layer = _check_prunable(layers, spec)
    io = layer_io if layer_io is not None else InMemoryLayers(model, layers)
    report = PruneReport(spec.method, spec.pattern_str, float(spec.sparsity), 0.0, profile=spec.profile)
    needs_calibration = method.needs_calibration or spec.profile == "owl"
    if needs_calibration and (calib_windows is None or calib_windows.numel() == 0):
        raise ValueError(f"method '{spec.method}' (profile {spec.profile}) needs calibration windows")
    t0 = time.perf_counter()
    if spec.profile == "owl":
        from .owl import outlier_ratios, owl_sparsities

        report.outlier_ratios = outlier_ratios(model, layers, calib_windows, spec.owl_m, progress,
                                               layer_io=io.reader())
        report.block_sparsities = owl_sparsities(report.outlier_ratios, spec.sparsity, spec.owl_lambda)
    else:
        report.block_sparsities = [float(spec.sparsity)] * len(layers)
    block_specs = [replace(spec, sparsity=s) for s in report.block_sparsities]
    if not method.needs_calibration:
        for i, linears in enumerate(tqdm(per_layer, desc=f"{spec.method}", unit="layer", disable=not progress)):
            io.load(i)
            _apply(i, linears, None, method, block_specs[i], report)
            io.done(i)
    else:
        inputs = io.capture(calib_windows)
        scratch = torch.empty_like(inputs.hidden)
        bar = tqdm(list(enumerate(layers)), desc=f"{spec.method}", unit="layer", disable=not progress)
        for i, layer in bar:
            io.load(i)
            stats = collect_input_stats(layer, per_layer[i], inputs, scratch, hessian=method.needs_hessian)
            require_stats(stats, per_layer[i], i)
            if on_layer is not None:
                on_layer(i, stats)
            _apply(i, per_layer[i], stats, method, block_specs[i], report)
            run_layer(layer, inputs, scratch)  # outputs of the pruned block feed the next block
            inputs.hidden, scratch = scratch, inputs.hidden
            io.done(i)
    report.seconds = time.perf_counter() - t0
    return report
