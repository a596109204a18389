"""Export a pruned model as a compressed-tensors checkpoint (llm-compressor's sparse formats; serving it with
vLLM is not tested here).

    export_compressed_tensors(model, "out/ct")        # model pruned in place, or swapped by sparsify_

Written, atomically: ``config.json`` with a ``quantization_config`` holding only a ``sparsity_config``,
``model.safetensors``, ``generation_config.json`` and the tokenizer when given. On-disk layout of a
compressed layer ``L`` whose stored weight (as in the architecture's state dict) is W (rows, cols):

* ``sparse-24-bitmask`` (every compressed layer 2:4: at most 2 non-zeros in every 4 consecutive entries
  of a row): ``L.shape`` int64 (2, 1) = [[rows], [cols]]; ``L.compressed`` (rows, cols / 2) W's dtype, the
  2 kept entries of each group of 4 in column order (a group with fewer non-zeros keeps its lowest zero
  positions, so every group has exactly 2); ``L.bitmask`` uint8 (rows, ceil(cols / 8)), bit j % 8 of byte
  j // 8 set for each kept column j (little-endian bit order, exactly 2 bits per group).
* ``sparse-bitmask`` (any sparsity): ``L.shape`` int64 (2,) = [rows, cols]; ``L.compressed`` (nnz,) the
  non-zeros in row-major order; ``L.bitmask`` uint8 as above, bits of the non-zeros; ``L.row_offsets``
  int64 (rows,), where row r's values start.
* Every other tensor (biases, norms, embeddings, dense layers) under its state-dict name. A tensor shared
  by two names (tied embeddings) is written once, under the first name, as ``save_pretrained`` does: a
  reader that decompresses into an existing model (``ModelCompressor.decompress(dir, model)``) unties the
  LM head and leaves it as it was, so call ``model.tie_weights()`` afterwards, as transformers' own loader
  does (tests/test_export.py checks an OPT model, whose embeddings are tied, that way).

compressed-tensors holds one sparsity compressor per checkpoint, so the format is chosen for the whole
model: ``"auto"`` picks sparse-24-bitmask when every compressed layer is 2:4, else sparse-bitmask for all.
Readers: compressed-tensors 0.13.0-0.14.x (``ModelCompressor.from_pretrained(dir)``, then
``.decompress(dir, model)`` or ``.sparsity_compressor.decompress(dir)``; 0.13.0 is the newest that installs
beside transformers 5, as 0.14 pins transformers < 5). compressed-tensors 0.15+ dropped the sparse
compressors, and transformers 5's own loader asks for compressed-tensors >= 0.15, so
``AutoModelForCausalLM.from_pretrained(dir)`` raises an ImportError on these folders. The layout follows the compressed-tensors source as documentation; none of its code is used.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .checkpoint import atomic_output_dir
from .formats import pack_nm
from .models import is_linear, linear_weight
from .nn.sparse_linear import SparseLinear

__all__ = ["export_compressed_tensors", "CT_FORMATS", "CT_LAYOUT_VERSION"]

CT_FORMATS = ("sparse-24-bitmask", "sparse-bitmask")
# compressed-tensors release whose on-disk sparse layout this writes (0.13.0 and 0.14.x read it).
CT_LAYOUT_VERSION = "0.13.0"
_SPARSE_BUFFERS = ("values", "index_codes", "bitmask", "row_offsets")


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols / 8)), column j at bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    width = -(-cols // 8)
    padded = mask.new_zeros(rows, width * 8)
    padded[:, :cols] = mask
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=mask.device)
    return (padded.reshape(rows, width, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _is_24(w: torch.Tensor) -> bool:
    rows, cols = w.shape
    return cols % 4 == 0 and bool(((w.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def _sparse24_tensors(w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    packed = pack_nm(w, 2, 4)  # exactly 2 slots per group: non-zeros first, then the lowest zero positions
    cols_idx = (torch.arange(cols // 4, device=w.device).repeat_interleave(2) * 4).unsqueeze(0) \
        + packed.indices.to(torch.int64)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    mask.scatter_(1, cols_idx, True)
    return {"shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
            "compressed": packed.values.contiguous(),
            "bitmask": _pack_bits(mask)}


def _bitmask_tensors(w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    mask = w != 0
    counts = mask.sum(-1)
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64),
            "compressed": w[mask].contiguous(),
            "bitmask": _pack_bits(mask),
            "row_offsets": (counts.cumsum(0) - counts).to(torch.int64)}


def _reference_classes(config) -> dict[str, str]:
    """Class name of every module the config builds (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    return {name: type(m).__name__ for name, m in ref.named_modules()}


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, path: str, format: str = "auto", min_sparsity: float = 0.5,
                              include_lm_head: bool = False, tokenizer=None, overwrite: bool = False) -> dict:
    """Write ``model`` to ``path`` as a compressed-tensors sparse checkpoint; return a summary dict.

    Compressed: every ``SparseLinear``, and every ``nn.Linear`` / ``Conv1D`` with at least
    ``int(min_sparsity * numel)`` zeros (not the LM head unless ``include_lm_head``; not a weight tied to
    another module). format: ``"auto"``, ``"sparse-24-bitmask"`` (raises naming the first layer that is not
    2:4) or ``"sparse-bitmask"``. Weights are written in their own dtype; nothing is quantized.
    """
    from safetensors.torch import save_file

    if not (0.0 <= min_sparsity <= 1.0):  # NaN fails too
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if format != "auto" and format not in CT_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(CT_FORMATS)}, got {format!r}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no transformers config; export needs a transformers model")
    ref_classes = _reference_classes(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    # The weight of each compressed layer as the architecture stores it (Conv1D: transposed).
    stored: dict[str, torch.Tensor] = {}
    dense_linears: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            w = mod.to_dense()
        elif is_linear(mod):
            w = linear_weight(mod)
            zeros = int((w == 0).sum())
            skip = ((mod is head and not include_lm_head) or owners.get(id(mod.weight), 0) > 1
                    or zeros == 0 or zeros < int(min_sparsity * w.numel()))
            if skip:
                dense_linears.append(name)
                continue
        else:
            continue
        stored[name] = w.t() if ref_classes.get(name) == "Conv1D" else w
    if not stored:
        raise ValueError("no sparse linear layer to export: prune the model first (or lower min_sparsity)")

    if format == "auto":
        format = "sparse-24-bitmask" if all(_is_24(w) for w in stored.values()) else "sparse-bitmask"
    elif format == "sparse-24-bitmask":
        for name, w in stored.items():
            if not _is_24(w):
                raise ValueError(f"layer '{name}' is not 2:4 sparse (more than 2 non-zeros in a group of 4 "
                                 "consecutive inputs, or a width not divisible by 4): use format='sparse-bitmask'")
    pack = _sparse24_tensors if format == "sparse-24-bitmask" else _bitmask_tensors

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in stored and (leaf == "weight" or leaf in _SPARSE_BUFFERS):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied: stored once
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    zeros = total = 0
    for name, w in stored.items():
        for leaf, t in pack(w).items():
            tensors[f"{name}.{leaf}"] = t.cpu().contiguous()
        zeros += int((w == 0).sum())
        total += w.numel()
    packed_values = {f"{n}.compressed" for n in stored}
    for key, t in tensors.items():
        if t.is_floating_point() and key not in packed_values:
            zeros += int((t == 0).sum())
            total += t.numel()

    sparsity_config = {
        "format": format,
        "global_sparsity": zeros / max(1, total),
        "sparsity_structure": "2:4" if format == "sparse-24-bitmask" else "unstructured",
        "targets": sorted(stored),
        "ignore": sorted(dense_linears),
    }
    with atomic_output_dir(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        cpath = os.path.join(tmp, "config.json")
        with open(cpath) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": CT_LAYOUT_VERSION,
                                      "sparsity_config": sparsity_config}
        with open(cpath, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except ValueError:
                pass
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"format": format, "layers": sorted(stored), "dense_linears": sorted(dense_linears),
            "global_sparsity": sparsity_config["global_sparsity"]}
