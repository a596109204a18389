"""LASER: layer-selective rank reduction (Sharma, Ash and Misra 2024, "The Truth is in There").

An intervention (l, tau, rho) replaces matrix type tau of decoder layer l by its best rank-r
approximation, r = max(1, floor(rho * min(m, n))): rho is the fraction of the maximum rank *kept*.
The search scores every single intervention on a validation split, then composes greedily: starting
from the best single one, add the next best (on another matrix) while the validation score improves.

* Matrix types come from the architecture, not from a table per model family: the linears of each
  decoder layer, named by their path inside the layer (``mlp.down_proj``, GPT-2's ``attn.c_attn``).
  ``discover_matrix_types`` runs the model once on a few tokens with hooks and gives each a role from the
  data flow: inside the attention module (a module whose class or path says attention), the linears that
  read the block's first input are q/k/v (one fused ``attn.qkv`` if alone; q, k, v told apart by name,
  else by call order) and the last one called is ``attn.o``; in the MLP, the linears reading its input are
  ``mlp.up`` (and ``mlp.gate``, the one whose output an activation module reads) and the last one called is
  ``mlp.down``. A linear left without a role keeps its path as its short name.
* ``LaserFactors`` computes every SVD of a search once: the target matrices are stacked by shape across
  layers and types and factored by ``sparsekit.svd.truncated_svd`` at the largest rank any rho asks of
  that shape; every rho then takes the leading columns.
* ``apply_interventions`` swaps in a ``LowRankLinear`` when the factors are smaller than the matrix
  (r < mn / (m + n)); otherwise the reduced matrix is written back dense, as the LASER reference does. It
  returns a handle whose ``restore()`` undoes everything.
* Evaluations during the search skip the layers below the intervened one: the outputs of layer l - 1 on
  the validation split are recorded once from the unmodified model (``PrefixCache``) and replayed.

What this does not do: LASER's other interventions (magnitude dropout, zeroing), per-example log-loss
selection, or fine-tuning after the reduction.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import find_decoder_layers, find_linears, is_linear, linear_weight
from .nn.low_rank import LowRankLinear, low_rank_saves_bytes
from .svd import truncated_svd

__all__ = [
    "MatrixType", "Intervention", "discover_matrix_types", "resolve_matrix_types", "parse_layers",
    "parse_rhos", "rank_for", "LaserFactors", "AppliedInterventions", "apply_interventions",
    "PerplexityObjective", "MultipleChoiceObjective", "PrefixCache", "SingleResult", "ComposeStep",
    "SearchResult", "greedy_compose", "laser_search",
]

GROUPS = ("attn", "mlp", "all")


# ----------------------------------------------------------------------------------------------------------
# Matrix types
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixType:
    """One kind of linear layer of the decoder blocks.

    name: path inside a decoder layer (``self_attn.o_proj``); role: ``attn.q|k|v|qkv|o`` or
    ``mlp.gate|up|down``, or None when the data flow does not say; short: the role, or the name;
    block: ``attn`` or ``mlp``; shape: (out, in) in the first layer that has it; layers: where it exists.
    """

    name: str
    role: str | None
    short: str
    block: str
    shape: tuple[int, int]
    layers: tuple[int, ...]


_ATTN = re.compile(r"att(n|ention)", re.IGNORECASE)
_QKV_HINTS = {"q": re.compile(r"(^|[_.])(q|query|wq)([_.]|$)", re.I),
              "k": re.compile(r"(^|[_.])(k|key|wk)([_.]|$)", re.I),
              "v": re.compile(r"(^|[_.])(v|value|wv)([_.]|$)", re.I)}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


@torch.no_grad()
def _trace_layer(model: nn.Module, layer: nn.Module) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]],
                                                               list[torch.Tensor]]:
    """Run the model on 8 tokens; return the calls of ``layer``'s linears in order as (name, input, output)
    and the inputs of its other leaf modules (activations, norms)."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    leaf_inputs: list[torch.Tensor] = []
    handles = []
    linears = find_linears(layer)
    for name, mod in layer.named_modules():
        if name in linears:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, args[0], out))))
        elif name and not list(mod.children()):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args: leaf_inputs.extend(a for a in args if isinstance(a, torch.Tensor))))
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 8) or 8)
    ids = (torch.arange(1, 9, device=device) % max(vocab, 1)).unsqueeze(0)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls, leaf_inputs


def _roles_from_trace(layer: nn.Module, calls, leaf_inputs) -> dict[str, str]:
    """Role of each linear name from one traced forward of ``layer`` (see the module docstring)."""
    def in_attention(name: str) -> bool:
        parts = name.split(".")[:-1]
        for i in range(len(parts)):
            path = ".".join(parts[: i + 1])
            if _ATTN.search(parts[i]) or _ATTN.search(type(layer.get_submodule(path)).__name__):
                return True
        return False

    first_call: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    order: list[str] = []
    for name, x, y in calls:
        if name not in first_call:
            first_call[name] = (x, y)
            order.append(name)
    roles: dict[str, str] = {}
    for block in ("attn", "mlp"):
        names = [n for n in order if in_attention(n) == (block == "attn")]
        if not names:
            continue
        x0 = first_call[names[0]][0]
        inputs = [n for n in names if _same_tensor(first_call[n][0], x0)]
        rest = [n for n in names if n not in inputs]
        if len(rest) == 1:
            roles[rest[0]] = f"{block}.o" if block == "attn" else "mlp.down"
        if block == "attn":
            if len(inputs) == 1:
                roles[inputs[0]] = "attn.qkv"
            elif len(inputs) == 3:
                tail = {n: n.split(".")[-1] for n in inputs}
                hinted = {r: [n for n in inputs if pat.search(tail[n])] for r, pat in _QKV_HINTS.items()}
                if all(len(v) == 1 for v in hinted.values()) and len({v[0] for v in hinted.values()}) == 3:
                    roles.update({v[0]: f"attn.{r}" for r, v in hinted.items()})
                else:  # every transformers attention computes q, k, v in this order
                    roles.update({n: f"attn.{r}" for n, r in zip(inputs, "qkv")})
        else:
            if len(inputs) == 1:
                roles[inputs[0]] = "mlp.up"
            elif len(inputs) == 2:
                feeds_activation = [n for n in inputs
                                    if any(_same_tensor(first_call[n][1], t) for t in leaf_inputs)]
                if len(feeds_activation) != 1:
                    feeds_activation = [n for n in inputs if "gate" in n.split(".")[-1].lower()]
                gate = feeds_activation[0] if len(feeds_activation) == 1 else inputs[0]
                roles[gate] = "mlp.gate"
                roles[next(n for n in inputs if n != gate)] = "mlp.up"
    return roles


def discover_matrix_types(model: nn.Module, layers: nn.ModuleList | None = None) -> dict[str, MatrixType]:
    """Every matrix type of the decoder layers, keyed by its path inside a layer, in first-seen order.

    Roles come from one traced forward on 8 tokens (the first layer that has each name). If the model
    cannot run that forward, every type keeps its path as its short name and block is guessed from it.
    """
    layers = find_decoder_layers(model) if layers is None else layers
    per_layer = [find_linears(layer) for layer in layers]
    names: dict[str, list[int]] = {}
    for i, lin in enumerate(per_layer):
        for n in lin:
            names.setdefault(n, []).append(i)
    probe = sorted({where[0] for where in names.values()})
    roles: dict[str, str] = {}
    for li in probe:
        try:
            calls, leaf_inputs = _trace_layer(model, layers[li])
        except Exception as e:  # noqa: BLE001 - roles are a convenience; names still work
            warnings.warn(f"could not trace {type(model).__name__} to give matrix types roles ({e}); "
                          "use their paths", stacklevel=2)
            break
        for n, r in _roles_from_trace(layers[li], calls, leaf_inputs).items():
            roles.setdefault(n, r)
    counts: dict[str, int] = {}
    for r in roles.values():
        counts[r] = counts.get(r, 0) + 1
    out = {}
    for n, where in names.items():
        role = roles.get(n)
        if role is not None and counts[role] > 1:
            role = None
        block = role.split(".")[0] if role else ("attn" if _ATTN.search(n) else "mlp")
        shape = tuple(linear_weight(per_layer[where[0]][n]).shape)
        out[n] = MatrixType(n, role, role or n, block, shape, tuple(where))
    return out


def resolve_matrix_types(spec: str | Sequence[str], types: dict[str, MatrixType]) -> list[str]:
    """Matrix type names (paths) from a comma list of paths, short names, or the groups attn, mlp, all.

    Raises ValueError naming the unknown entry and listing what exists."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ValueError("no matrix type given")
    by_short = {t.short: t.name for t in types.values()}
    chosen: list[str] = []
    for item in items:
        if item in types:
            found = [item]
        elif item in by_short:
            found = [by_short[item]]
        elif item == "all":
            found = list(types)
        elif item in ("attn", "mlp"):
            found = [t.name for t in types.values() if t.block == item]
        else:
            listing = ", ".join(f"{t.short} ({t.name})" if t.short != t.name else t.name for t in types.values())
            raise ValueError(f"unknown matrix type '{item}': this model has {listing}; or a group: "
                             f"{', '.join(GROUPS)}")
        chosen += [f for f in found if f not in chosen]
    return chosen


def parse_layers(spec: str, n_layers: int | None) -> list[int]:
    """Layer indices from ``all``, ``last-half``, or a comma list of indices and inclusive ranges ``A-B``
    (negative indices count from the end: ``-1`` is the last layer). Raises ValueError when out of range.
    With ``n_layers=None`` only the syntax is checked (and [] returned)."""
    spec = spec.strip()
    if spec in ("all", "last-half"):
        if n_layers is None:
            return []
        return list(range(0 if spec == "all" else n_layers // 2, n_layers))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:\s*(?:-|\.\.)\s*(-?\d+))?", part)
        if not m:
            raise ValueError(f"bad layer entry '{part}': use indices and ranges like 20-29,31, or all, last-half")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if n_layers is None:
            continue
        for v in (a, b):
            if not -n_layers <= v < n_layers:
                raise ValueError(f"layer {v} is out of range: the model has {n_layers} decoder layers "
                                 f"(0-{n_layers - 1}, or -{n_layers}..-1 from the end)")
        a, b = a % n_layers, b % n_layers
        if a > b:
            raise ValueError(f"layer range '{part}' is empty (start after end)")
        out += [i for i in range(a, b + 1) if i not in out]
    return out


def parse_rhos(spec: str | Sequence[float]) -> list[float]:
    """Rank fractions kept, each in (0, 1]. Raises ValueError otherwise."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no rho given")
    out = []
    for s in items:
        try:
            rho = float(s)
        except ValueError:
            raise ValueError(f"rho '{s}' is not a number") from None
        if not (0.0 < rho <= 1.0) or math.isnan(rho):
            raise ValueError(f"rho must be in (0, 1] (the fraction of the maximum rank kept), got {s}")
        if rho not in out:
            out.append(rho)
    return sorted(out)


def rank_for(rho: float, shape: Sequence[int]) -> int:
    """Kept rank: max(1, floor(rho * min(m, n))) (LASER's int(max_rank * rho), never zero)."""
    k = min(shape[-2:])
    return max(1, min(k, int(math.floor(rho * k + 1e-9))))


@dataclass(frozen=True, order=True)
class Intervention:
    """(layer, matrix type path, rho): keep the best rank-floor(rho * min(m, n)) part of that matrix."""

    layer: int
    matrix_type: str
    rho: float

    def label(self, types: dict[str, MatrixType] | None = None) -> str:
        short = types[self.matrix_type].short if types and self.matrix_type in types else self.matrix_type
        return f"L{self.layer} {short} rho={self.rho:g}"


# ----------------------------------------------------------------------------------------------------------
# Factors, and applying them
# ----------------------------------------------------------------------------------------------------------

def _target(layers: nn.ModuleList, layer: int, name: str) -> nn.Module:
    try:
        mod = layers[layer].get_submodule(name)
    except AttributeError:
        raise ValueError(f"decoder layer {layer} has no matrix '{name}'") from None
    if not is_linear(mod):
        raise ValueError(f"layer {layer} '{name}' is a {type(mod).__name__}, not a linear layer "
                         "(already reduced?)")
    return mod


class LaserFactors:
    """Truncated SVDs of every (layer, matrix type) of a search, computed once.

    Matrices are grouped by (shape, dtype) across layers and types and each group is factored in stacks
    (``truncated_svd`` on (B, m, n), at most ``max_stack_bytes`` of float32 input per call) at the
    largest rank that any of ``rhos`` asks of that shape. ``factors(layer, name, rank)`` then returns the
    leading ``rank`` columns: U (m, r), S (r,), V (n, r) in float32. ``svd_calls`` counts the calls.
    """

    def __init__(self, model: nn.Module, targets: Sequence[tuple[int, str]], rhos: Sequence[float],
                 method: str = "randomized", oversample: int = 10, power_iters: int = 2, seed: int = 0,
                 max_stack_bytes: int = 512 * 2**20, progress: bool = False):
        if method not in ("exact", "randomized"):
            raise ValueError(f"unknown SVD method '{method}', choose exact or randomized")
        self.method, self.svd_calls, self.seconds = method, 0, 0.0
        self._factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        layers = find_decoder_layers(model)
        groups: dict[tuple, list[tuple[int, str]]] = {}
        for layer, name in dict.fromkeys(targets):
            w = linear_weight(_target(layers, layer, name))
            groups.setdefault((tuple(w.shape), w.dtype), []).append((layer, name))
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        bar = tqdm(total=len(dict.fromkeys(targets)), desc="svd", unit="mat", disable=not progress, leave=False)
        for (shape, _), members in groups.items():
            rank = max(rank_for(rho, shape) for rho in rhos)
            per_call = max(1, max_stack_bytes // (4 * shape[0] * shape[1]))
            for i in range(0, len(members), per_call):
                chunk = members[i: i + per_call]
                stack = torch.stack([linear_weight(_target(layers, l, n)).detach().float() for l, n in chunk])
                kw = {} if method == "exact" else {"oversample": oversample, "power_iters": power_iters,
                                                     "generator": gen if stack.device.type == "cpu" else
                                                     torch.Generator(device=stack.device).manual_seed(seed + i)}
                u, s, v = truncated_svd(stack, rank, method=method, **kw)
                self.svd_calls += 1
                for j, key in enumerate(chunk):
                    self._factors[key] = (u[j].clone(), s[j].clone(), v[j].clone())
                bar.update(len(chunk))
        bar.close()
        self.seconds = time.perf_counter() - t0

    def max_rank(self, layer: int, name: str) -> int:
        return self._factors[(layer, name)][1].shape[0]

    def factors(self, layer: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (layer, name) not in self._factors:
            raise KeyError(f"no factors for layer {layer} '{name}': not among this search's targets")
        u, s, v = self._factors[(layer, name)]
        if rank > s.shape[0]:
            raise ValueError(f"rank {rank} exceeds the {s.shape[0]} computed for layer {layer} '{name}'")
        return u[:, :rank], s[:rank], v[:, :rank]


@dataclass
class AppliedInterventions:
    """What ``apply_interventions`` changed; ``restore()`` puts the original modules and weights back."""

    model: nn.Module
    records: list[dict] = field(default_factory=list)  # per intervention: layer, matrix_type, rho, rank, storage
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.records.clear()

    def __enter__(self) -> "AppliedInterventions":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def apply_interventions(model: nn.Module, interventions: Sequence[Intervention], factors: LaserFactors
                        ) -> AppliedInterventions:
    """Replace each targeted matrix by its rank-r truncation (r = ``rank_for(rho, shape)``).

    A ``LowRankLinear`` (factors V and U*S, the bias kept) when r < mn / (m + n), else the reduced matrix
    U_r S_r V_r^T written into the original weight (dense). Two interventions on one matrix are refused.
    """
    layers = find_decoder_layers(model)
    seen = set()
    for iv in interventions:
        if (iv.layer, iv.matrix_type) in seen:
            raise ValueError(f"two interventions target layer {iv.layer} '{iv.matrix_type}'")
        seen.add((iv.layer, iv.matrix_type))
    handle = AppliedInterventions(model)
    try:
        for iv in interventions:
            mod = _target(layers, iv.layer, iv.matrix_type)
            weight = linear_weight(mod)
            out_f, in_f = weight.shape
            rank = rank_for(iv.rho, weight.shape)
            u, s, v = factors.factors(iv.layer, iv.matrix_type, rank)
            if low_rank_saves_bytes(out_f, in_f, rank):
                new = LowRankLinear.from_factors(u.to(weight.dtype), s.to(weight.dtype), v.to(weight.dtype),
                                                 mod.bias)
                new.train(mod.training)
                _set_submodule(layers[iv.layer], iv.matrix_type, new)
                handle._undo.append(lambda li=iv.layer, p=iv.matrix_type, m=mod: _set_submodule(layers[li], p, m))
                storage = "low_rank"
            else:
                original = weight.clone()
                weight.copy_(((u * s) @ v.t()).to(weight.dtype))
                handle._undo.append(lambda w=weight, o=original: w.copy_(o))
                storage = "dense"
            handle.records.append({"layer": iv.layer, "matrix_type": iv.matrix_type, "rho": iv.rho,
                                   "rank": rank, "max_rank": min(out_f, in_f), "storage": storage})
    except BaseException:
        handle.restore()
        raise
    return handle


# ----------------------------------------------------------------------------------------------------------
# Objectives (validation / test splits) and the prefix cache
# ----------------------------------------------------------------------------------------------------------

class PerplexityObjective:
    """Perplexity over (n, L) token windows (``sparsekit.evaluate.perplexity``); lower is better."""

    kind, unit = "ppl", "windows"

    def __init__(self, windows: torch.Tensor, source: str = "text"):
        if windows.dim() != 2 or windows.shape[0] < 1:
            raise ValueError(f"{source}: need at least one window of tokens, got shape {tuple(windows.shape)}")
        self.windows, self.source = windows, source

    def __len__(self) -> int:
        return self.windows.shape[0]

    def evaluate(self, model: nn.Module, progress: bool = False, desc: str = "ppl") -> dict:
        from .evaluate import perplexity

        return {"ppl": perplexity(model, self.windows, progress=progress, desc=desc),
                "tokens": int(self.windows.numel())}

    @staticmethod
    def key(metrics: dict) -> tuple:
        ppl = metrics["ppl"]  # a NaN perplexity (a broken reduction) ranks last, never anywhere in between
        return (-ppl if not math.isnan(ppl) else -math.inf,)

    @staticmethod
    def headline(metrics: dict) -> float:
        return metrics["ppl"]

    def positions(self, hidden_elem_bytes: int) -> int:
        return int(self.windows.numel()) * hidden_elem_bytes


class MultipleChoiceObjective:
    """Accuracy on multiple-choice examples (``sparsekit.tasks.score_multiple_choice``); higher is better,
    ties broken by acc_norm."""

    kind, unit = "mc", "questions"

    def __init__(self, examples: list, tokenizer, source: str = "task", max_len: int = 1024):
        if not examples:
            raise ValueError(f"{source}: the split holds no questions")
        self.examples, self.tokenizer, self.source, self.max_len = examples, tokenizer, source, max_len

    def __len__(self) -> int:
        return len(self.examples)

    def evaluate(self, model: nn.Module, progress: bool = False, desc: str = "mc") -> dict:
        from .tasks import score_multiple_choice

        return score_multiple_choice(model, self.tokenizer, self.examples, max_len=self.max_len,
                                     progress=progress, desc=desc)

    @staticmethod
    def key(metrics: dict) -> tuple:
        return (metrics["acc"], metrics["acc_norm"])

    @staticmethod
    def headline(metrics: dict) -> float:
        return metrics["acc"]

    def positions(self, hidden_elem_bytes: int) -> int:
        total = 0
        for ex in self.examples:  # as tasks._choice_logliks pads them: choices x longest sequence
            lens = [min(self.max_len, len(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                        + len(self.tokenizer(k, add_special_tokens=False)["input_ids"]))
                    for c, k in zip(ex.contexts, ex.continuations)]
            total += len(lens) * max(lens)
        return total * hidden_elem_bytes


class _ReplayLayer(nn.Module):
    """Stands in for a decoder layer below the first changed one: returns the recorded output of layer
    start - 1 for the current model call (the last stub of the prefix advances the call counter)."""

    def __init__(self, original: nn.Module, outputs: list, state: dict, last: bool):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: parameters stay counted once
        self._outputs, self._state, self._last = outputs, state, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        i = self._state["call"]
        if i >= len(self._outputs):
            raise RuntimeError("prefix cache out of step: more model calls than were recorded")
        out = self._outputs[i]
        hidden = args[0] if args else kwargs.get("hidden_states")
        ref = out[0] if isinstance(out, tuple) else out
        if hidden is not None and tuple(hidden.shape) != tuple(ref.shape):
            raise RuntimeError(f"prefix cache out of step at call {i}: input {tuple(hidden.shape)} but recorded "
                               f"{tuple(ref.shape)} (the evaluation must call the model the same way each time)")
        if self._last:
            self._state["call"] = i + 1
        return out


class PrefixCache:
    """Outputs of decoder layers on one objective's evaluation of the unmodified model, so that evaluating a
    model changed only from layer ``start`` on skips layers [0, start).

    ``capture(starts)`` evaluates the unmodified model once (returning its metrics) and records the output of
    layer ``start - 1`` for every model call; ``evaluate(model, start)`` replays it. Correct only while
    layers below ``start`` are unchanged and the objective calls the model identically each time (checked
    by shape on every call and by the call count at the end).
    """

    def __init__(self, model: nn.Module, objective):
        self.model, self.objective = model, objective
        self.layers = find_decoder_layers(model)
        self._outputs: dict[int, list] = {}

    def bytes_per_layer(self) -> int:
        p = next(self.model.parameters())
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        return self.objective.positions(max(hidden, 1) * p.element_size())

    @torch.no_grad()
    def capture(self, starts: Sequence[int], progress: bool = False, desc: str = "base") -> dict:
        starts = [s for s in starts if s > 0]
        store = {s: [] for s in starts}
        handles = [self.layers[s - 1].register_forward_hook(lambda m, a, out, s=s: store[s].append(out))
                   for s in starts]
        try:
            metrics = self.objective.evaluate(self.model, progress=progress, desc=desc)
        finally:
            for h in handles:
                h.remove()
        self._outputs.update(store)
        return metrics

    def drop(self, starts: Sequence[int] | None = None) -> None:
        for s in list(self._outputs) if starts is None else starts:
            self._outputs.pop(s, None)

    @torch.no_grad()
    def evaluate(self, start: int, progress: bool = False, desc: str = "eval") -> dict:
        outputs = self._outputs.get(start)
        if start <= 0 or outputs is None:
            return self.objective.evaluate(self.model, progress=progress, desc=desc)
        state = {"call": 0}
        originals = [self.layers[j] for j in range(start)]
        try:
            for j in range(start):
                self.layers[j] = _ReplayLayer(originals[j], outputs, state, last=(j == start - 1))
            metrics = self.objective.evaluate(self.model, progress=progress, desc=desc)
        finally:
            for j in range(start):
                self.layers[j] = originals[j]
        if state["call"] != len(outputs):
            raise RuntimeError(f"prefix cache out of step: {state['call']} model calls, {len(outputs)} recorded")
        return metrics


# ----------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SingleResult:
    intervention: Intervention
    rank: int
    max_rank: int
    storage: str  # "low_rank" or "dense"
    metrics: dict


@dataclass
class ComposeStep:
    added: Intervention
    metrics: dict
    accepted: bool


@dataclass
class SearchResult:
    base: dict  # validation metrics of the unmodified model
    singles: list[SingleResult]  # best first
    composed: list[Intervention]
    composed_metrics: dict  # validation metrics of the composition (base if empty)
    steps: list[ComposeStep]
    seconds: float


def greedy_compose(ranked: Sequence[Intervention], score: Callable[[list[Intervention]], tuple],
                   base_score: tuple) -> tuple[list[Intervention], tuple, list[tuple[Intervention, tuple, bool]]]:
    """Greedy composition: walk ``ranked`` (best single first), try adding each intervention whose matrix is
    not already reduced, keep it if ``score(chosen + [it])`` beats the best so far, stop at the first that
    does not. Returns (chosen, best score, [(tried, its score, accepted)])."""
    chosen: list[Intervention] = []
    best = base_score
    tried = []
    for iv in ranked:
        if any((c.layer, c.matrix_type) == (iv.layer, iv.matrix_type) for c in chosen):
            continue
        s = score(chosen + [iv])
        accepted = s > best
        tried.append((iv, s, accepted))
        if not accepted:
            break
        chosen.append(iv)
        best = s
    return chosen, best, tried


def laser_search(model: nn.Module, objective, interventions: Sequence[Intervention], factors: LaserFactors,
                 compose: bool = True, progress: bool = False, cache_bytes: int = 2**30,
                 on_result: Callable[[SingleResult], None] | None = None) -> SearchResult:
    """Score each single intervention on ``objective``, rank them, compose greedily.

    Evaluations run layer by layer with a ``PrefixCache`` holding at most ``cache_bytes`` of recorded
    activations (0 disables it). The model is left unmodified.
    """
    t0 = time.perf_counter()
    cache = PrefixCache(model, objective)
    per_layer = max(1, cache_bytes // max(1, cache.bytes_per_layer())) if cache_bytes > 0 else 0
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)
    order = sorted(by_layer)
    base = None
    singles: list[SingleResult] = []
    bar = tqdm(total=len(interventions), desc="laser (val)", unit="iv", disable=not progress)
    chunks = [order[i: i + per_layer] for i in range(0, len(order), per_layer)] if per_layer else [order]
    for chunk in chunks:
        metrics = cache.capture(chunk if per_layer else [], progress=progress, desc="base (val)")
        base = base or metrics
        for layer in chunk:
            for iv in by_layer[layer]:
                with apply_interventions(model, [iv], factors) as applied:
                    m = cache.evaluate(layer if per_layer else 0, progress=progress, desc=iv.label())
                    rec = applied.records[0]
                res = SingleResult(iv, rec["rank"], rec["max_rank"], rec["storage"], m)
                singles.append(res)
                if on_result:
                    on_result(res)
                bar.update(1)
                bar.set_postfix(base=f"{objective.headline(base):.4g}", last=f"{objective.headline(m):.4g}")
        cache.drop([l for l in chunk if not (compose and l == order[0])])  # the composition starts there
    bar.close()
    if base is None:
        base = objective.evaluate(model, progress=progress, desc="base (val)")
    # Best first; among equal scores the more compressing (smaller rho), then the earlier layer.
    singles.sort(key=lambda r: (tuple(-x for x in objective.key(r.metrics)), r.intervention.rho,
                                r.intervention.layer, r.intervention.matrix_type))
    composed: list[Intervention] = []
    composed_metrics, steps = base, []
    if compose and singles:
        start = order[0] if per_layer else 0
        memo: dict[tuple, dict] = {}

        def score(ivs: list[Intervention]) -> tuple:
            key = tuple(ivs)
            if len(ivs) == 1:
                memo[key] = next(r.metrics for r in singles if r.intervention == ivs[0])
            if key not in memo:
                with apply_interventions(model, ivs, factors):
                    memo[key] = cache.evaluate(start, progress=progress, desc=f"compose {len(ivs)}")
            return objective.key(memo[key])

        composed, _, tried = greedy_compose([r.intervention for r in singles], score, objective.key(base))
        cache.drop()
        steps = [ComposeStep(iv, memo[tuple(composed[:i] + [iv])] if acc else memo[tuple(composed + [iv])], acc)
                 for i, (iv, _, acc) in enumerate(tried)]
        if composed:
            composed_metrics = memo[tuple(composed)]
    return SearchResult(base, singles, composed, composed_metrics, steps, time.perf_counter() - t0)
