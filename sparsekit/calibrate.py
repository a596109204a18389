"""Sequential, layer-by-layer calibration (as in the Wanda and SparseGPT references).

1. ``capture_layer_inputs`` runs the model on the calibration windows until the first decoder layer and
   records that layer's inputs (hidden states and the keyword arguments the model passes it: position
   embeddings, masks, ...), then stops the forward. Only the embeddings run.
2. For each decoder layer, ``collect_input_stats`` replays the layer over the recorded inputs with hooks on
   its linear layers that accumulate input statistics; the caller then prunes the layer, and
   ``run_layer`` replays it again so the next layer sees the outputs of the *pruned* layer.

Memory is one buffer of layer inputs plus one of outputs, each (nsamples, seqlen, hidden), whatever the
model's context window; statistics are accumulated per batch and no activation is kept beyond it.
Works for any architecture whose blocks are called as ``layer(hidden_states, *args, **kwargs)`` and return
a tensor or a tuple whose first element is the new hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import ops

__all__ = [
    "InMemoryLayers",
    "LayerInputs",
    "LinearStats",
    "capture_layer_inputs",
    "run_layer",
    "collect_input_stats",
    "mirror_lower_",
]


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for every calibration window.

    hidden: (nsamples, seqlen, hidden) in the model's dtype. args / kwargs: per-window extra positional and
    keyword arguments of the layer call, exactly as the model passed them to its first layer.
    """

    hidden: torch.Tensor
    args: list[tuple]
    kwargs: list[dict]

    def __len__(self) -> int:
        return self.hidden.shape[0]


@dataclass
class LinearStats:
    """Statistics of the inputs of one linear layer over all calibration tokens.

    sq_norm: (in_features,) float32, sum over tokens of x_j^2 (so ||X_j||_2 = sqrt(sq_norm_j)).
    xtx: (in_features, in_features) float32 sum over tokens of x^T x, when asked for (SparseGPT).
    abs_sum: (in_features,) float32 sum over tokens of |x_j|, when asked for (contextual pruning: the mean
    |activation| of channel j is abs_sum_j / tokens).
    tokens: number of tokens accumulated.
    Linears that read the same input tensor (q/k/v, gate/up) share one LinearStats object.
    """

    sq_norm: torch.Tensor
    xtx: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    tokens: int = 0

    def abs_mean(self) -> torch.Tensor:
        """Mean |x_j| over the accumulated tokens (needs ``abs_sum``)."""
        if self.abs_sum is None:
            raise ValueError("these statistics were collected without abs_sum")
        return self.abs_sum / max(self.tokens, 1)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _share_equal(value, previous):
    """``value`` with each tensor replaced by the tensor at the same place in ``previous`` where the two are equal
    (same shape, dtype, device and values); tuples, lists and dicts are walked in step."""
    if isinstance(value, torch.Tensor):
        if (isinstance(previous, torch.Tensor) and previous is not value and previous.shape == value.shape
                and previous.dtype == value.dtype and previous.device == value.device
                and bool(torch.equal(previous, value))):
            return previous
        return value
    if isinstance(value, dict):
        prev = previous if isinstance(previous, dict) else {}
        return {k: _share_equal(v, prev.get(k)) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        prev = previous if isinstance(previous, (tuple, list)) and len(previous) == len(value) else [None] * len(value)
        shared = [_share_equal(v, p) for v, p in zip(value, prev)]
        return tuple(shared) if isinstance(value, tuple) else shared
    return value


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor,
                         device: torch.device | None = None) -> LayerInputs:
    """Run ``model`` on each window (n, L) up to ``layers[0]`` and record that layer's inputs.

    device: where the token ids go (default: the device of the model's first parameter)."""
    device = device if device is not None else _model_device(model)
    n = windows.shape[0]
    hidden = None
    args_list: list[tuple] = []
    kwargs_list: list[dict] = []

    def catch(module, args, kwargs):
        nonlocal hidden
        if args:
            h, rest = args[0], tuple(args[1:])
        else:  # some blocks are called with hidden_states=...
            kwargs = dict(kwargs)
            h, rest = kwargs.pop("hidden_states"), ()
        if hidden is None:
            hidden = torch.empty((n,) + tuple(h.shape[1:]), dtype=h.dtype, device=h.device)
        hidden[len(args_list)] = h[0]
        # Windows of one length get equal masks and position embeddings: keep one copy of each (an eager
        # attention mask is L x L per window, which would make memory grow as n * L^2).
        previous = (args_list[-1], kwargs_list[-1]) if args_list else None
        args_list.append(_share_equal(rest, previous[0] if previous else None))
        kwargs_list.append(_share_equal(dict(kwargs), previous[1] if previous else None))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(n):
            try:
                model(input_ids=windows[i: i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - a model that never called its first layer
                raise RuntimeError(f"{type(model).__name__} finished a forward pass without calling its first "
                                   "decoder layer; cannot capture layer inputs")
    finally:
        handle.remove()
    return LayerInputs(hidden, args_list, kwargs_list)


class InMemoryLayers:
    """Layer access for a model held in memory, the ``layer_io`` of ``prune_model`` and
    ``owl.outlier_ratios`` by default: ``capture`` runs the model up to its first block, ``load`` / ``done``
    have nothing to do. ``sparsekit.offload.LayerReader`` / ``OffloadWriter`` are the on-disk ones."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList):
        self.model, self.layers = model, layers

    def capture(self, windows: torch.Tensor) -> LayerInputs:
        return capture_layer_inputs(self.model, self.layers, windows)

    def load(self, i: int) -> None:
        pass

    def done(self, i: int) -> None:
        pass

    def reader(self) -> "InMemoryLayers":
        """The access for a pass that only reads the layers (OWL's): this one."""
        return self


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, out: torch.Tensor | None = None,
              before_each: Callable[[], None] | None = None) -> torch.Tensor:
    """Run ``layer`` on every recorded input; write outputs to ``out`` (allocated if None) and return it.

    Each window is moved to the layer's device if ``inputs.hidden`` lives elsewhere (host memory)."""
    if out is None:
        out = torch.empty_like(inputs.hidden)
    param = next(layer.parameters(), None)
    device = param.device if param is not None else inputs.hidden.device
    for i in range(len(inputs)):
        if before_each is not None:
            before_each()
        h = inputs.hidden[i: i + 1]
        if h.device != device:  # activations kept in host memory while the layer runs on the GPU (offload)
            h = h.to(device, non_blocking=True)
        y = layer(h, *inputs.args[i], **inputs.kwargs[i])
        out[i] = _layer_output(y)[0]
    return out


_MIRROR_BLOCK = 128


def mirror_lower_(xtx: torch.Tensor) -> torch.Tensor:
    """Overwrite the strict upper triangle of the square ``xtx`` with the transposed lower one; returns xtx.

    By strips of 128 columns: each strip above the diagonal is one transposed copy of the rows beside it
    (torch's copy_ transposes in cache-sized tiles). On CPU that is 4x faster than transposing the whole lower
    triangle at once at 1536 channels and 7x at 4096 (117 -> 17 ms, 1 thread; benchmarks/bench_xtx.py).
    """
    channels = xtx.shape[0]
    for s in range(0, channels, _MIRROR_BLOCK):
        e = min(s + _MIRROR_BLOCK, channels)
        diag = xtx[s:e, s:e]
        diag.copy_(diag.tril() + diag.tril(-1).t())
        if s:
            xtx[:s, s:e].copy_(xtx[s:e, :s].t())
    return xtx


def _group_conflict(name: str, stats: dict) -> ValueError:
    group = sorted(n for n, s in stats.items() if s is stats.get(name)) or [name]
    return ValueError(f"linear layers {', '.join(group)} read the very same input tensor in some calibration "
                      f"windows but not in others (at '{name}'): statistics shared by tensor identity would mix "
                      "them. Such a layer cannot be calibrated as a group.")


def require_stats(stats: dict, linears: dict, layer_idx: int) -> None:
    """Raise ValueError naming the linears of block ``layer_idx`` that no calibration token reached (an expert
    no token was routed to, a linear whose weight is used without calling the module), or whose statistics
    hold inf or NaN (inputs that overflowed: scores made of them would prune at random)."""
    missing = [name for name in linears if name not in stats]
    if missing:
        raise ValueError(f"decoder block {layer_idx}: no calibration token reached {', '.join(missing)}, so "
                         "there are no statistics to prune them by; use more or longer calibration windows "
                         "(--nsamples / --seqlen), or a method without calibration (magnitude)")
    broken = [name for name in linears
              if not all(bool(torch.isfinite(t).all()) for t in (stats[name].sq_norm, stats[name].abs_sum)
                         if t is not None)]
    if broken:
        raise ValueError(f"decoder block {layer_idx}: the calibration statistics of {', '.join(broken)} hold inf "
                         "or NaN: the inputs of those linears overflowed (a float16 model? calibrate with "
                         "--dtype float32 or bfloat16)")


@torch.no_grad()
def collect_input_stats(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs,
                        scratch: torch.Tensor | None = None, hessian: bool = False, abs_sum: bool = False
                        ) -> dict[str, LinearStats]:
    """Replay ``layer`` over ``inputs`` and accumulate each linear's input statistics.

    One forward over all windows. Linears that receive the very same input tensor in a forward (q/k/v
    projections, gate/up projections: found by tensor identity, not by name) form a group whose statistics
    are computed once and shared. Per group and batch, the input is read once by the fused
    ``channel_sqnorm_accumulate_`` op (sum x^2), or with ``abs_sum`` by ``channel_stats_accumulate_`` (sum x^2
    and sum |x| together), and, with ``hessian``, by ``xtx_lower_accumulate_`` (x^T x in float32, on and
    below the diagonal only); then it is dropped. After the forward pass each ``xtx`` is mirrored
    (``mirror_lower_``), so every returned ``xtx`` is the full symmetric matrix. ``scratch`` (like
    ``inputs.hidden``) receives the layer's outputs, which are unused.
    """
    from .models import linear_weight

    stats: dict[str, LinearStats] = {}
    # the inputs of the current forward, each with its stats and the layer that fed it, kept alive so that
    # identity cannot be confused by memory reuse
    seen: list[tuple[torch.Tensor, LinearStats, str]] = []
    handles = []

    def make_hook(name: str, in_features: int, device: torch.device):
        def hook(module, args):
            x = args[0]
            for other, st, _ in seen:
                if other is x:
                    if stats.get(name, st) is not st:  # grouped with other layers in an earlier window
                        raise _group_conflict(name, stats)
                    stats[name] = st
                    return
            st = stats.get(name)
            # a group member reading a different tensor than the member that fed the group in this window
            if st is not None and any(s is st and owner != name for _, s, owner in seen):
                raise _group_conflict(name, stats)
            if st is None:
                st = LinearStats(torch.zeros(in_features, dtype=torch.float32, device=device))
                if hessian:
                    st.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
                if abs_sum:
                    st.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
                stats[name] = st
            seen.append((x, st, name))
            x2 = x.detach().reshape(-1, in_features)
            if abs_sum:  # sum x^2 and sum |x| from one read of x
                ops.channel_stats_accumulate_(st.sq_norm, st.abs_sum, x2)
            else:
                ops.channel_sqnorm_accumulate_(st.sq_norm, x2)
            if hessian:
                ops.xtx_lower_accumulate_(st.xtx, x2)
            st.tokens += x2.shape[0]

        return hook

    for name, lin in linears.items():
        w = linear_weight(lin)
        handles.append(lin.register_forward_pre_hook(make_hook(name, w.shape[1], w.device)))
    try:
        run_layer(layer, inputs, scratch, before_each=seen.clear)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    if hessian:
        for st in {id(st): st for st in stats.values()}.values():  # shared groups once
            mirror_lower_(st.xtx)
    from .distributed import all_reduce_stats_

    all_reduce_stats_(stats)  # under torchrun: sums over every rank's windows (no-op in one process)
    return stats
