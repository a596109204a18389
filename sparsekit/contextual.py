"""Contextual pruning for a domain (Mini-GPTs, Valicenti, Vidal and Patnaik 2023), with physical removal.

Mini-GPTs prune what a domain does not use: neurons whose mean |activation| on domain text is low, and
embedding rows of tokens the domain never uses. Their reference zeroes weights; here the structure is
removed for real, so the model has fewer parameters in memory and on disk:

* **MLP channels**: an intermediate channel j of a decoder layer's MLP (a row of each input projection,
  gate and up in gated MLPs, and column j of the output projection). Its activation is the output
  projection's input, i.e. after the activation function and the gating (SwiGLU: act(gate) * up).
* **attention heads**: rows of q (and of k/v when every query head has its own key/value head) and the
  matching columns of o. With grouped-query attention, the same number of query heads is removed from
  every key/value group, so the head-to-group mapping stays valid.
* **vocabulary**: embedding and LM-head rows of tokens that never occur in the domain text. The tokenizer
  is rebuilt with the kept tokens renumbered (BPE merges whose result was removed are dropped), so the
  domain text tokenizes exactly as before and any other text falls back to smaller kept pieces; generation
  decodes to the right text with the new tokenizer. ``vocab_map[new_id] = old_id``.

Parts of a decoder layer are found structurally (by shapes and by which linears share a parent), not from a
table of layer names. Scores: ``activation`` (Mini-GPTs: mean |activation| over domain tokens) or ``wanda``
(the structured Wanda-style baseline: ||X_j||_2 * sum_i |W_out[i, j]| summed over the channel or head).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import LinearStats, capture_layer_inputs, collect_input_stats, run_layer
from .compressed import compressed_layers_error, count_parameters
from .models import find_decoder_layers, find_linears

__all__ = [
    "ContextualError",
    "MLPParts",
    "AttentionParts",
    "find_mlp",
    "find_attention",
    "DomainStats",
    "collect_domain_stats",
    "ContextualPlan",
    "ContextualWarning",
    "plan_removal",
    "apply_plan",
    "shrink_mlp_",
    "remove_heads_",
    "check_plain_layers",
    "vocabulary_keep_set",
    "prune_vocabulary_",
]


class ContextualError(ValueError):
    """A contextual-pruning request that cannot be carried out (named reason)."""


class ContextualWarning(UserWarning):
    """A contextual-pruning request carried out differently from what was asked (named reason)."""


# --------------------------------------------------------------------------------------------------
# Structure discovery
# --------------------------------------------------------------------------------------------------


@dataclass
class MLPParts:
    """The MLP of one decoder layer: input projections (rows = channels) and the output projection."""

    parent: nn.Module
    inputs: list[str]  # attribute names on ``parent`` (gate, up / fc1)
    output: str  # attribute name on ``parent`` (down / fc2)
    output_qualname: str  # name of the output projection inside the decoder layer (its stats key)

    @property
    def width(self) -> int:
        return getattr(self.parent, self.output).in_features

    def channel_cost(self) -> int:
        """Parameters removed with one channel."""
        cost = 0
        for n in self.inputs:
            lin = getattr(self.parent, n)
            cost += lin.in_features + (1 if lin.bias is not None else 0)
        return cost + getattr(self.parent, self.output).out_features


@dataclass
class AttentionParts:
    """Self-attention of one decoder layer with separate q/k/v/o projections."""

    module: nn.Module
    q: str
    kv: list[str]  # k and v attribute names (order irrelevant: both are treated alike)
    o: str
    o_qualname: str
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def head_cost(self) -> int:
        """Parameters removed with one query head (and, without GQA, its key/value heads)."""
        q, o = getattr(self.module, self.q), getattr(self.module, self.o)
        cost = self.head_dim * (q.in_features + (1 if q.bias is not None else 0)) + self.head_dim * o.out_features
        if self.num_kv_heads == self.num_heads:
            for n in self.kv:
                lin = getattr(self.module, n)
                cost += self.head_dim * (lin.in_features + (1 if lin.bias is not None else 0))
        return cost


def _children_linears(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}


def _parents_with_linears(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if _children_linears(m)]


def find_mlp(layer: nn.Module, hidden: int) -> MLPParts:
    """The MLP of a decoder layer: an output linear (in = I != hidden, out = hidden) and the linears next to
    it (same parent module) that read the hidden state and produce I channels."""
    found = []
    for pname, parent in _parents_with_linears(layer):
        lins = _children_linears(parent)
        for oname, out in lins.items():
            if out.out_features != hidden or out.in_features == hidden:
                continue
            ins = [n for n, lin in lins.items() if n != oname and lin.in_features == hidden
                   and lin.out_features == out.in_features]
            if ins:
                found.append(MLPParts(parent, ins, oname, f"{pname}.{oname}" if pname else oname))
    if not found:
        conv = [n for n, m in layer.named_modules() if type(m).__name__ == "Conv1D"]
        why = (" (its MLP uses transformers' Conv1D, which contextual pruning does not shrink yet)" if conv
               else "")
        raise ContextualError(f"{type(layer).__name__}: found no MLP (an output nn.Linear from I != hidden={hidden} "
                              f"channels to hidden, with input linears next to it){why}")
    if len(found) > 1:  # e.g. o_proj of attention whose width differs from hidden: prefer an MLP-like name
        named = [f for f in found if re.search(r"mlp|ffn|feed_forward|fc", f.output_qualname)]
        if len(named) == 1:
            return named[0]
        raise ContextualError(f"{type(layer).__name__}: ambiguous MLP candidates "
                              f"{[f.output_qualname for f in found]}")
    return found[0]


def find_attention(layer: nn.Module, hidden: int) -> AttentionParts:
    """Self-attention with separate q/k/v/o linears and a ``head_dim`` attribute (Llama, Mistral, Qwen2, Phi,
    OPT, ...). Raises ContextualError where heads cannot be removed (fused qkv, no head_dim)."""
    for pname, mod in _parents_with_linears(layer):
        lins = _children_linears(mod)
        if len(lins) < 4:
            continue
        head_dim = getattr(mod, "head_dim", None)
        if not isinstance(head_dim, int):
            continue
        # The output projection is registered after q/k/v in every transformers architecture; when q and o are
        # both hidden x hidden, shapes alone cannot tell them apart, so try the last-registered first.
        outs = [n for n, lin in lins.items() if lin.out_features == hidden and lin.in_features % head_dim == 0]
        for oname in reversed(outs):
            o = lins[oname]
            readers = [n for n, lin in lins.items() if n != oname and lin.in_features == hidden]
            qs = [n for n in readers if lins[n].out_features == o.in_features]
            if not qs:
                continue
            num_heads = o.in_features // head_dim
            if len(qs) == 3:  # multi-head attention: q, k, v alike; q is the first registered
                q, kv = qs[0], qs[1:]
                num_kv = num_heads
            else:
                q = qs[0]
                kv = [n for n in readers if n != q and lins[n].out_features % head_dim == 0
                      and lins[n].out_features < o.in_features]
                if len(kv) != 2:
                    continue
                num_kv = lins[kv[0]].out_features // head_dim
            if num_heads % num_kv:
                continue
            return AttentionParts(mod, q, kv, oname, f"{pname}.{oname}" if pname else oname, head_dim,
                                  num_heads, num_kv)
    raise ContextualError(f"{type(layer).__name__}: found no attention with separate q/k/v/o linears and a "
                          "head_dim attribute; heads cannot be removed in this architecture (use --heads 0)")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class DomainStats:
    """What the domain uses.

    token_counts: (vocab,) occurrences of each token id in the domain text.
    mlp: per decoder layer, the stats of the MLP output projection's input (its channels are the MLP's
      intermediate channels, after activation and gating): ``abs_sum`` / ``tokens`` is the mean |act|,
      ``sq_norm`` gives ||X_j||_2 for the Wanda-style score.
    attn: per decoder layer, the stats of the attention output projection's input (channels grouped by
      head), or None where the architecture's heads cannot be removed.
    linear_out_abs_mean: mean |output| of every linear's output channels, by qualified name.
    """

    token_counts: torch.Tensor
    mlp: list[LinearStats]
    attn: list[LinearStats | None]
    linear_out_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0


def check_plain_layers(model: nn.Module) -> None:
    """Raise ContextualError if ``model`` holds compressed layers (``LowRankLinear`` from ``sparsekit laser``,
    ``SparseLinear`` from ``--save-compressed``): contextual pruning shrinks plain ``nn.Linear`` layers, and an MLP
    with a low-rank projection would be shrunk in its other projections only."""
    reason = compressed_layers_error(model, "contextual pruning")
    if reason:
        raise ContextualError(reason + ", then laser or prune its output")


@torch.no_grad()
def collect_domain_stats(model: nn.Module, windows: torch.Tensor, token_ids: torch.Tensor | None = None,
                         progress: bool = False) -> DomainStats:
    """One streaming pass over the calibration ``windows`` (n, L), layer by layer (bounded memory), with the
    statistics engine of ``sparsekit.calibrate`` accumulating sum |x| and sum x^2 per channel for every
    linear's input (shared by linears reading the same tensor) and a hook for each linear's mean |output|.
    ``token_ids`` (1-D): the domain text whose token frequencies decide the vocabulary (default: windows).
    """
    check_plain_layers(model)
    layers = find_decoder_layers(model)
    hidden = model.config.hidden_size
    vocab = model.get_input_embeddings().num_embeddings
    ids = (token_ids if token_ids is not None else windows).reshape(-1)
    if ids.numel() and int(ids.max()) >= vocab:
        raise ContextualError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    counts = torch.bincount(ids, minlength=vocab)
    inputs = capture_layer_inputs(model, layers, windows)
    scratch = torch.empty_like(inputs.hidden)
    mlp_stats, attn_stats, out_abs = [], [], {}
    full_names = {m: n for n, m in model.named_modules()}
    bar = tqdm(range(len(layers)), desc="domain stats", unit="layer", disable=not progress, leave=False)
    for i in bar:
        layer = layers[i]
        mlp = find_mlp(layer, hidden)
        try:
            attn = find_attention(layer, hidden)
        except ContextualError:
            attn = None
        linears = find_linears(layer)
        handles = []
        sums: dict[str, list] = {}

        def out_hook(name):
            def hook(module, args, out):
                o = out.detach().reshape(-1, out.shape[-1])
                acc = sums.setdefault(name, [torch.zeros(o.shape[-1], dtype=torch.float32), 0])
                acc[0] += o.abs().sum(0, dtype=torch.float32).cpu()
                acc[1] += o.shape[0]
            return hook

        for name, lin in linears.items():
            handles.append(lin.register_forward_hook(out_hook(full_names[lin])))
        try:
            stats = collect_input_stats(layer, linears, inputs, scratch, abs_sum=True)
        finally:
            for h in handles:
                h.remove()
        for name, (s, n) in sums.items():
            out_abs[name] = s / max(n, 1)
        mlp_stats.append(stats[mlp.output_qualname])
        attn_stats.append(stats[attn.o_qualname] if attn is not None else None)
        run_layer(layer, inputs, scratch)  # the next layer's inputs (dense model: nothing was pruned)
        inputs.hidden, scratch = scratch, inputs.hidden
    return DomainStats(counts, mlp_stats, attn_stats, out_abs, tokens=int(windows.numel()))


# --------------------------------------------------------------------------------------------------
# Scores and plan
# --------------------------------------------------------------------------------------------------


SCORES = ("activation", "wanda")


def mlp_channel_scores(parts: MLPParts, st: LinearStats, score: str) -> torch.Tensor:
    if score == "activation":
        return st.abs_mean()
    w = getattr(parts.parent, parts.output).weight.detach().float()
    return st.sq_norm.sqrt() * w.abs().sum(0)


def head_scores(parts: AttentionParts, st: LinearStats, score: str) -> torch.Tensor:
    if score == "activation":
        ch = st.abs_mean()
    else:
        w = getattr(parts.module, parts.o).weight.detach().float()
        ch = st.sq_norm.sqrt() * w.abs().sum(0)
    per_head = ch.reshape(parts.num_heads, parts.head_dim)
    return per_head.mean(1) if score == "activation" else per_head.sum(1)


@dataclass
class ContextualPlan:
    """What to remove: kept MLP channels and query heads per layer, kept token ids (sorted)."""

    mlp_keep: list[torch.Tensor]
    head_keep: list[torch.Tensor | None]
    vocab_keep: torch.Tensor | None
    dense_params: int
    planned_params: int

    def summary(self, widths: list[int], heads: list[int | None], vocab: int) -> dict:
        return {
            "mlp_channels": {"before": sum(widths), "after": sum(int(k.numel()) for k in self.mlp_keep),
                             "per_layer_after": [int(k.numel()) for k in self.mlp_keep]},
            "heads": {"before": sum(h or 0 for h in heads),
                      "after": sum(int(k.numel()) if k is not None else (h or 0) for k, h in zip(self.head_keep, heads)),
                      "per_layer_after": [h if k is None else int(k.numel()) for k, h in zip(self.head_keep, heads)]},
            "vocab": {"before": vocab, "after": int(self.vocab_keep.numel()) if self.vocab_keep is not None else vocab},
        }


def _vocab_cost(model: nn.Module) -> int:
    """Parameters removed with one vocabulary row (embedding, and the LM head unless tied; its bias)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    cost = emb.embedding_dim
    if head is not None and head.weight is not emb.weight:
        cost += head.in_features
    if head is not None and getattr(head, "bias", None) is not None:
        cost += 1
    return cost


def plan_removal(model: nn.Module, stats: DomainStats, *, target_params: float | None = None,
                 threshold: float | None = None, heads: float = 0.0, scope: str = "layer",
                 score: str = "activation", vocab_keep: torch.Tensor | None = None) -> ContextualPlan:
    """Choose what to remove.

    * ``vocab_keep``: token ids to keep (see ``vocabulary_keep_set``), or None to keep the vocabulary.
    * ``heads``: fraction of query heads to remove in every layer (rounded per key/value group).
    * then MLP channels, by ``target_params`` (fraction of the dense parameter count to keep, counted in
      memory with embeddings) or by ``threshold`` (remove channels whose mean |activation| is below it).
      ``scope="layer"`` removes the same number of channels from every layer (the same width everywhere, so
      the result is also a plain transformers checkpoint where the config can state its head count too, see
      ``apply_plan``); ``"global"`` ranks channels of all layers
      together, each layer's scores divided by their mean so that layers compare.
    """
    if score not in SCORES:
        raise ContextualError(f"unknown score '{score}', choose one of {', '.join(SCORES)}")
    if scope not in ("layer", "global"):
        raise ContextualError(f"unknown scope '{scope}', choose layer or global")
    if (target_params is None) == (threshold is None):
        raise ContextualError("give exactly one of target_params (fraction of parameters to keep) or threshold")
    if target_params is not None and not (0.0 < target_params <= 1.0):
        raise ContextualError(f"target_params is the fraction of parameters to keep, in (0, 1]; got {target_params}")
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise ContextualError(f"threshold must be a finite mean |activation| >= 0, got {threshold}")
    if not (0.0 <= heads < 1.0):
        raise ContextualError(f"heads is the fraction of query heads to remove, in [0, 1); got {heads}")
    if score == "wanda" and threshold is not None:
        raise ContextualError("threshold applies to mean |activation| (score=activation); use target_params "
                              "with score=wanda")
    layers = find_decoder_layers(model)
    hidden = model.config.hidden_size
    mlps = [find_mlp(layer, hidden) for layer in layers]
    dense = count_parameters(model)
    removed = 0

    if vocab_keep is not None:
        removed += (model.get_input_embeddings().num_embeddings - vocab_keep.numel()) * _vocab_cost(model)

    head_keep: list[torch.Tensor | None] = [None] * len(layers)
    if heads > 0:
        for i, layer in enumerate(layers):
            attn = find_attention(layer, hidden)
            st = stats.attn[i]
            if st is None:
                raise ContextualError(f"layer {i}: no attention statistics collected")
            # With grouped-query attention the same number of query heads goes from every key/value group;
            # without it (plain multi-head attention) the heads are one group and their k/v rows go with them.
            gqa = attn.num_kv_heads != attn.num_heads
            groups, size = (attn.num_kv_heads, attn.group_size) if gqa else (1, attn.num_heads)
            where = f"{size} query heads per key/value group" if gqa else f"{size} heads"
            per_group = round(heads * size)
            if per_group >= size:
                raise ContextualError(f"layer {i}: removing {heads:.0%} of heads would remove all {where}")
            if per_group == 0:
                raise ContextualError(f"layer {i}: heads={heads} removes no head of {where} (the smallest step is "
                                      f"{1 / size:.3g}); pass a larger fraction or 0")
            sc = head_scores(attn, st, score).reshape(groups, size)
            keep = []
            for g in range(groups):
                order = torch.sort(sc[g], stable=True).indices  # lowest first; ties: lower index removed first
                keep.append(torch.sort(order[per_group:]).values + g * size)
            head_keep[i] = torch.cat(keep)
            removed += per_group * groups * attn.head_cost()

    scores = [mlp_channel_scores(p, stats.mlp[i], score) for i, p in enumerate(mlps)]
    drop = [0] * len(layers)
    if threshold is not None:
        for i, s in enumerate(scores):
            drop[i] = int((s < threshold).sum())
            if drop[i] >= s.numel():
                raise ContextualError(f"threshold {threshold} removes every MLP channel of layer {i} (its largest "
                                      f"mean |activation| is {float(s.max()):.4g})")
    else:
        need = dense * (1.0 - target_params) - removed
        # The vocabulary and the heads alone went past the target: no MLP channel goes (1.0 asks for none anyway).
        if need < 0 and target_params < 1.0:
            warnings.warn(ContextualWarning(
                f"removing the vocabulary and heads alone keeps {(dense - removed) / dense:.1%} of the parameters, "
                f"below target_params={target_params:g}: no MLP channel is removed (--no-vocab or --keep-text keep more of "
                "the vocabulary, a smaller --heads more heads)"), stacklevel=2)
        if need > 0:
            costs = [p.channel_cost() for p in mlps]
            if scope == "layer":
                k = math.ceil(need / sum(costs))
                for i, p in enumerate(mlps):
                    if k >= p.width:
                        raise ContextualError(
                            f"target_params={target_params} needs {k} of {p.width} MLP channels removed from every "
                            "layer: that removes every channel; ask for a larger fraction (or remove heads)")
                    drop[i] = k
            else:
                norm = torch.cat([s / s.mean().clamp_min(1e-30) for s in scores])
                owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
                order = torch.sort(norm, stable=True).indices
                got = 0.0
                for j in order.tolist():
                    if got >= need:
                        break
                    i = int(owner[j])
                    drop[i] += 1
                    got += costs[i]
                    if drop[i] >= scores[i].numel():
                        raise ContextualError(f"target_params={target_params} would remove every MLP channel of "
                                              f"layer {i}; ask for a larger fraction")
    mlp_keep = []
    for i, s in enumerate(scores):
        order = torch.sort(s, stable=True).indices
        mlp_keep.append(torch.sort(order[drop[i]:]).values)
        removed += drop[i] * mlps[i].channel_cost()
    return ContextualPlan(mlp_keep, head_keep, vocab_keep, dense, dense - removed)


# --------------------------------------------------------------------------------------------------
# Physical removal
# --------------------------------------------------------------------------------------------------


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.train(old.training)
    return lin


@torch.no_grad()
def shrink_mlp_(parts: MLPParts, keep: torch.Tensor) -> None:
    """Keep only the MLP channels ``keep`` (sorted indices): rows of the inputs, columns of the output."""
    if keep.numel() == 0:
        raise ContextualError("cannot remove every MLP channel of a layer")
    keep = keep.to(getattr(parts.parent, parts.output).weight.device)
    for n in parts.inputs:
        lin = getattr(parts.parent, n)
        setattr(parts.parent, n, _new_linear(lin, lin.weight[keep], None if lin.bias is None else lin.bias[keep]))
    out = getattr(parts.parent, parts.output)
    setattr(parts.parent, parts.output, _new_linear(out, out.weight[:, keep], out.bias))


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).reshape(-1)


@torch.no_grad()
def remove_heads_(parts: AttentionParts, keep: torch.Tensor) -> None:
    """Keep only the query heads ``keep`` (sorted; with GQA, the same number in every key/value group)."""
    n_keep = keep.numel()
    if n_keep == 0:
        raise ContextualError("cannot remove every attention head of a layer")
    gqa = parts.num_kv_heads != parts.num_heads
    if gqa:
        groups = torch.bincount(keep // parts.group_size, minlength=parts.num_kv_heads)
        if not bool((groups == groups[0]).all()) or int(groups[0]) == 0:
            raise ContextualError(f"with grouped-query attention every key/value group must keep the same number "
                                  f"(>= 1) of query heads; got {groups.tolist()}")
    mod = parts.module
    q = getattr(mod, parts.q)
    rows = _head_rows(keep.to(q.weight.device), parts.head_dim)
    setattr(mod, parts.q, _new_linear(q, q.weight[rows], None if q.bias is None else q.bias[rows]))
    if not gqa:
        for n in parts.kv:
            lin = getattr(mod, n)
            setattr(mod, n, _new_linear(lin, lin.weight[rows], None if lin.bias is None else lin.bias[rows]))
    o = getattr(mod, parts.o)
    setattr(mod, parts.o, _new_linear(o, o.weight[:, rows], o.bias))
    new_kv = parts.num_kv_heads if gqa else n_keep
    for attr, value in (("num_heads", n_keep), ("num_attention_heads", n_keep),
                        ("num_key_value_heads", new_kv), ("num_key_value_groups", n_keep // new_kv)):
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, value)


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ContextualError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: sparsekit cannot "
                              "rebuild its vocabulary mapping; use --no-vocab to keep the vocabulary")
    data = json.loads(backend.to_str())
    kind = data.get("model", {}).get("type")
    if kind not in ("BPE", "WordLevel"):
        raise ContextualError(f"tokenizer model {kind}: vocabulary pruning supports BPE and WordLevel tokenizers "
                              "(the vocabulary mapping of others is not rebuilt); use --no-vocab")
    return data


def _merge_pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def vocabulary_keep_set(tokenizer, token_counts: torch.Tensor, min_count: int = 1,
                        extra_ids: list[int] | None = None) -> torch.Tensor:
    """Sorted token ids to keep: those seen at least ``min_count`` times in the domain, every special or added
    token, every single-character (byte-level alphabet) and byte-fallback token, and, for BPE, both halves of
    every merge that produces a kept token (recursively), so that the domain text tokenizes exactly as before
    and any text can still be tokenized."""
    data = _tokenizer_json(tokenizer)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    id_to_tok = {i: t for t, i in vocab.items()}
    n_total = max(max(vocab.values()) + 1, len(token_counts),
                  max((a["id"] for a in data.get("added_tokens", [])), default=-1) + 1)
    keep = torch.zeros(n_total, dtype=torch.bool)
    seen = token_counts >= min_count
    keep[: seen.numel()] |= seen
    for a in data.get("added_tokens", []):
        keep[a["id"]] = True
    for tid in [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                *(extra_ids or [])]:
        if tid is not None and 0 <= tid < n_total:
            keep[tid] = True
    for t, i in vocab.items():
        if len(t) == 1 or _BYTE_FALLBACK.match(t):
            keep[i] = True
    if model["type"] == "BPE":
        producers: dict[str, list[tuple[str, str]]] = {}
        for m in model.get("merges", []):
            a, b = _merge_pair(m)
            producers.setdefault(a + b, []).append((a, b))
        stack = [id_to_tok[i] for i in keep.nonzero().flatten().tolist() if i in id_to_tok]
        while stack:
            t = stack.pop()
            for a, b in producers.get(t, ()):
                for part in (a, b):
                    j = vocab.get(part)
                    if j is not None and not keep[j]:
                        keep[j] = True
                        stack.append(part)
    return keep.nonzero().flatten()


def _remap_tokenizer(tokenizer, keep: torch.Tensor):
    """A new tokenizer whose ids are the positions of the kept old ids (same strings, same behaviour)."""
    from transformers import AutoTokenizer

    data = _tokenizer_json(tokenizer)
    old_to_new = {int(o): n for n, o in enumerate(keep.tolist())}
    model = data["model"]
    model["vocab"] = {t: old_to_new[i] for t, i in model["vocab"].items() if i in old_to_new}
    if model["type"] == "BPE":
        kept = model["vocab"]
        merges = []
        for m in model.get("merges", []):
            a, b = _merge_pair(m)
            if a in kept and b in kept and (a + b) in kept:
                merges.append(m)
        model["merges"] = merges
    for a in data.get("added_tokens", []):
        a["id"] = old_to_new[a["id"]]
    post = data.get("post_processor")

    def remap_post(p):
        if isinstance(p, dict):
            if p.get("type") == "TemplateProcessing":
                for tok in p.get("special_tokens", {}).values():
                    tok["ids"] = [old_to_new[i] for i in tok.get("ids", [])]
            for k in ("sep", "cls"):
                if k in p and isinstance(p[k], list) and len(p[k]) == 2:
                    p[k][1] = old_to_new[p[k][1]]
            for sub in p.get("processors", []) or []:
                remap_post(sub)

    remap_post(post)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        cfg_path = os.path.join(tmp, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            if "added_tokens_decoder" in cfg:
                cfg["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                               if int(k) in old_to_new}
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, ensure_ascii=False, indent=2)
        return AutoTokenizer.from_pretrained(tmp)


@torch.no_grad()
def prune_vocabulary_(model: nn.Module, tokenizer, keep: torch.Tensor):
    """Keep only the token ids ``keep`` (sorted) in the embedding and LM head, renumbered 0..K-1; return the
    remapped tokenizer. ``model.config`` (vocab_size, bos/eos/pad ids) and its generation config follow."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0 or not bool((keep[1:] > keep[:-1]).all()):
        raise ContextualError("vocabulary keep-set must be non-empty, sorted and without repeats")
    emb = model.get_input_embeddings()
    if int(keep[-1]) >= emb.num_embeddings or int(keep[0]) < 0:
        bad = int(keep[-1]) if int(keep[-1]) >= emb.num_embeddings else int(keep[0])
        raise ContextualError(f"token id {bad} is outside the embedding ({emb.num_embeddings} rows)")
    kept = set(keep.tolist())
    special = sorted({int(a["id"]) for a in _tokenizer_json(tokenizer).get("added_tokens", [])} - kept)
    if special:  # the remapped tokenizer must still hold them
        raise ContextualError(f"the vocabulary keep-set drops the tokenizer's added/special token ids {special[:8]}; "
                              "keep every added token")
    head0 = model.get_output_embeddings()
    for module, plain in ((emb, nn.Embedding), (head0, nn.Linear)):
        if module is not None and type(module) is not plain:
            raise ContextualError(f"vocabulary pruning rebuilds the {'embedding' if plain is nn.Embedding else 'LM head'}"
                                  f" as a plain {plain.__name__}, but this model's is {type(module).__name__}, which "
                                  "may do more (Gemma3's embedding scales its output); keep the vocabulary (--no-vocab)")
    new_tok = _remap_tokenizer(tokenizer, keep)
    old_to_new = {int(o): n for n, o in enumerate(keep.tolist())}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    idx = keep.to(emb.weight.device)
    new_emb = nn.Embedding(keep.numel(), emb.embedding_dim, padding_idx=old_to_new.get(emb.padding_idx)
                           if emb.padding_idx is not None else None, device=emb.weight.device, dtype=emb.weight.dtype)
    new_emb.weight.copy_(emb.weight[idx])
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = nn.Linear(head.in_features, keep.numel(), bias=head.bias is not None, device=head.weight.device,
                             dtype=head.weight.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            new_head.weight.copy_(head.weight[idx])
        if head.bias is not None:
            new_head.bias.copy_(head.bias[idx])
        model.set_output_embeddings(new_head)
    cfg = model.config
    cfg.vocab_size = keep.numel()
    for holder in (cfg, getattr(model, "generation_config", None)):
        if holder is None:
            continue
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            v = getattr(holder, attr, None)
            if isinstance(v, int):
                setattr(holder, attr, old_to_new.get(v))
            elif isinstance(v, list):
                setattr(holder, attr, [old_to_new[x] for x in v if x in old_to_new])
    return new_tok


# --------------------------------------------------------------------------------------------------
# Apply a plan
# --------------------------------------------------------------------------------------------------


_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


_HEAD_FIELDS = ("head_dim", "num_key_value_heads", "num_attention_heads")


def _config_says_heads(model: nn.Module, layers: list[nn.Module], hidden: int, n: int) -> bool:
    """Write the head count ``n`` that every layer kept into the config (``num_attention_heads``, ``head_dim``,
    and ``num_key_value_heads`` without GQA), and keep it only where a model built from the config (on the meta
    device) has the pruned attention's shapes and head counts. Returns whether the config was kept.

    Whether a config can say it depends on the architecture, so it is checked, not assumed: Llama, Mistral,
    Qwen2 and Phi read ``config.head_dim`` (Qwen2's and Phi's configs have no such field; it is added), but
    Llama's config refuses a hidden_size that is not a multiple of the head count, and OPT derives head_dim from
    hidden_size / heads. Where the config cannot say it, it is left as it was, and the saved manifest carries the
    per-layer head counts (``sparsekit.load_compressed``; ``plain_transformers_loadable`` is then false).
    """
    from .compressed import _differences

    cfg = model.config
    before = {f: getattr(cfg, f) for f in _HEAD_FIELDS if hasattr(cfg, f)}
    names = {id(m): name for name, m in model.named_modules()}
    attention = [names[id(find_attention(layer, hidden).module)] for layer in layers]
    try:
        kv = getattr(cfg, "num_key_value_heads", None)
        if kv is not None and kv == cfg.num_attention_heads:  # no GQA: the k/v heads went with the q heads
            cfg.num_key_value_heads = n
        cfg.head_dim = find_attention(layers[0], hidden).head_dim
        cfg.num_attention_heads = n
        validate = getattr(cfg, "validate", None)  # transformers' strict configs check again when saved
        if callable(validate):
            validate()
        modules, attributes = _differences(model, cfg)
        ok = not any(name == a or name.startswith(a + ".") for name in [*modules, *attributes] for a in attention)
    except Exception:  # noqa: BLE001 - the config refused it (validation, a read-only field): keep the old one
        ok = False
    if not ok:
        for f in _HEAD_FIELDS:
            if f in before:
                setattr(cfg, f, before[f])
            elif hasattr(cfg, f):
                delattr(cfg, f)
    return ok


@torch.no_grad()
def apply_plan(model: nn.Module, tokenizer, plan: ContextualPlan):
    """Remove what ``plan`` says, physically. Returns the (possibly remapped) tokenizer.

    Where every layer keeps the same width / head count, the config says so too (``intermediate_size``;
    ``num_attention_heads`` with an explicit ``head_dim`` where the config can state it, ``_config_says_heads``),
    so the saved folder is a plain transformers checkpoint; otherwise ``sparsekit.load_compressed`` rebuilds the
    per-layer shapes.
    """
    layers = find_decoder_layers(model)
    hidden = model.config.hidden_size
    cfg = model.config
    old_width = find_mlp(layers[0], hidden).width
    for i, layer in enumerate(layers):
        parts = find_mlp(layer, hidden)
        if plan.mlp_keep[i].numel() != parts.width:
            shrink_mlp_(parts, plan.mlp_keep[i])
    widths = {k.numel() for k in plan.mlp_keep}
    if len(widths) == 1:
        for f in _WIDTH_FIELDS:
            if getattr(cfg, f, None) == old_width:
                setattr(cfg, f, widths.pop())
                break
    if any(k is not None for k in plan.head_keep):
        counts = set()
        for i, layer in enumerate(layers):
            attn = find_attention(layer, hidden)
            keep = plan.head_keep[i]
            if keep is not None and keep.numel() != attn.num_heads:
                remove_heads_(attn, keep)
            counts.add(keep.numel() if keep is not None else attn.num_heads)
        if len(counts) == 1 and hasattr(cfg, "num_attention_heads"):
            _config_says_heads(model, layers, hidden, next(iter(counts)))
    if plan.vocab_keep is not None:
        tokenizer = prune_vocabulary_(model, tokenizer, plan.vocab_keep)
    return tokenizer
