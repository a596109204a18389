"""Swap a pruned model's linear layers for ``SparseLinear`` in place.

    report = sparsekit.sparsify_(model)                 # every pruned linear, format chosen per layer
    print(report.table())

Which layers: every ``nn.Linear`` (and transformers' ``Conv1D``) whose weight has at least
``int(min_sparsity * numel)`` zeros (the pruner's own count: 50% unstructured, 2:4 and 4:8 all pass the
default 0.5), that ``filter_fn(name, module)`` accepts, except the LM head (``model.get_output_embeddings()``)
unless ``include_lm_head=True``. Layers that share their weight tensor with another module (tied) are left
alone. Every layer is packed before any is swapped, so a weight that breaks an explicit N:M format raises
and leaves the model untouched.

Not done here: pruning (``sparsekit.prune``), saving (``sparsekit.save_compressed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .models import is_linear, linear_weight
from .nn.sparse_linear import DENSE_FALLBACKS, SparseLinear, parse_format

__all__ = ["sparsify_", "SparsifyReport", "SparsifiedLayer"]


@dataclass
class SparsifiedLayer:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    format: str
    sparsity: float  # fraction of zero weights
    bytes_before: int  # dense weight + bias
    bytes_after: int  # packed weight + bias (what state_dict / save_compressed hold)
    cache_bytes: int = 0  # dense copy kept in memory with dense_fallback="cache"


@dataclass
class SparsifyReport:
    layers: list[SparsifiedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def cache_bytes(self) -> int:
        return sum(r.cache_bytes for r in self.layers)

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "skipped": [list(s) for s in self.skipped],
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "cache_bytes": self.cache_bytes}

    def table(self) -> str:
        """One line per swapped layer and a total, for printing."""
        rows = [("layer", "shape", "format", "sparsity", "MiB before", "MiB after")]
        for r in self.layers:
            rows.append((r.name, f"{r.shape[0]}x{r.shape[1]}", r.format, f"{r.sparsity:.3f}",
                         f"{r.bytes_before / 2**20:.2f}", f"{r.bytes_after / 2**20:.2f}"))
        rows.append((f"total ({len(self.layers)} layers)", "", "", "", f"{self.bytes_before / 2**20:.2f}",
                     f"{self.bytes_after / 2**20:.2f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        if self.cache_bytes:
            lines.append(f"plus {self.cache_bytes / 2**20:.2f} MiB of dense copies in memory (dense_fallback='cache')")
        if self.skipped:
            lines.append(f"left dense: {len(self.skipped)} linear layers "
                         f"({'; '.join(f'{n}: {why}' for n, why in self.skipped[:4])}"
                         f"{'; ...' if len(self.skipped) > 4 else ''})")
        return "\n".join(lines)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# torch.nn modules that pass their child linears' .weight to fused functions instead of calling them (subclasses
# inherit that): MultiheadAttention always (out_proj), TransformerEncoderLayer on its inference fast path
# (linear1/linear2). A SparseLinear there (no .weight) breaks them. TransformerDecoderLayer calls its linears.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _reads_child_weights(parent: nn.Module) -> bool:
    return isinstance(parent, _READS_CHILD_WEIGHTS)


@torch.no_grad()
def sparsify_(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None, format: str = "auto",
              min_sparsity: float = 0.5, include_lm_head: bool = False,
              dense_fallback: str = "unpack", cslt: bool = True) -> SparsifyReport:
    """Replace every pruned linear layer of ``model`` by a ``SparseLinear`` in place; return what was done.

    format: ``"auto"`` (per layer: 2:4 when it fits, else bitmap, the smaller), ``"bitmap"``, or ``"N:M"``
    for every selected layer (a layer that breaks the pattern raises ValueError before anything is swapped).
    min_sparsity: a layer needs at least ``int(min_sparsity * numel)`` zero weights, in [0, 1].
    dense_fallback: ``"unpack"`` or ``"cache"`` (``SparseLinear``'s trade-off between memory and speed
    outside the measured sparse region).
    cslt: allow ``SparseLinear``'s cuSPARSELt path on CUDA (2:4 float16/bfloat16); False keeps no cuSPARSELt
    copy, so calls outside sparsekit's own kernels take the dense fallback.
    """
    if not (0.0 <= min_sparsity <= 1.0):
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if format != "auto":
        parse_format(format)  # raises on a malformed format before any work
    if dense_fallback not in DENSE_FALLBACKS:
        raise ValueError(f"dense_fallback must be one of {DENSE_FALLBACKS}, got {dense_fallback!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    report = SparsifyReport()
    planned: list[tuple[str, SparseLinear, SparsifiedLayer]] = []
    modules = dict(model.named_modules())
    for name, mod in model.named_modules():
        if not name or not is_linear(mod):
            continue
        parent = modules[name.rpartition(".")[0]]
        if _reads_child_weights(parent):
            report.skipped.append((name, f"its parent {type(parent).__name__} reads the weight tensor itself "
                                         "instead of calling the layer"))
            continue
        if head is not None and mod is head and not include_lm_head:
            report.skipped.append((name, "LM head (include_lm_head=True to swap it)"))
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            report.skipped.append((name, "filter_fn"))
            continue
        if owners.get(id(mod.weight), 0) > 1:
            report.skipped.append((name, "weight shared with another module (tied)"))
            continue
        weight = linear_weight(mod)
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            report.skipped.append((name, f"dtype {weight.dtype}"))
            continue
        zeros = int((weight == 0).sum())
        if zeros < int(min_sparsity * weight.numel()) or zeros == 0:
            report.skipped.append((name, f"sparsity {zeros / weight.numel():.3f} < min_sparsity {min_sparsity}"))
            continue
        try:
            layer = SparseLinear.from_linear(mod, format=format, dense_fallback=dense_fallback, cslt=cslt)
        except ValueError as e:
            if format == "auto":  # no packed form is smaller than dense: leave it
                report.skipped.append((name, str(e)))
                continue
            raise ValueError(f"layer '{name}': {e}") from e
        layer.train(mod.training)
        bias_bytes = _nbytes(getattr(mod, "bias", None))
        planned.append((name, layer, SparsifiedLayer(
            name, tuple(weight.shape), layer.format, zeros / weight.numel(), _nbytes(weight) + bias_bytes,
            layer.packed_bytes() + bias_bytes, _nbytes(layer.dense_weight))))
    for name, layer, row in planned:
        _set_module(model, name, layer)
        report.layers.append(row)
    return report
