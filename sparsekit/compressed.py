"""Save and load models whose modules were replaced or physically shrunk.

sparsekit changes models in three ways that a plain ``from_pretrained`` cannot always rebuild:

* compressed layers (``SparseLinear``, ``LowRankLinear``): other classes than the architecture's;
* shrunk layers (contextual pruning): ``nn.Linear`` / ``nn.Embedding`` narrower than the config says, with a
  different width in each decoder layer (and attention modules with fewer heads);
* a smaller vocabulary: the config's ``vocab_size`` changes (the tokenizer is remapped with it).

``save_compressed(model, DIR)`` writes, atomically:

* ``config.json`` / ``generation_config.json``: the model's (possibly updated) transformers config;
* ``model.safetensors``: the state dict; tensors shared between modules (tied embeddings) are stored once. Where
  the folder is not a plain transformers checkpoint (see below) the file is ``sparsekit_model.safetensors``
  instead, so that ``from_pretrained`` refuses the folder (no weights file) rather than loading the config's
  shapes with the differing layers randomly initialised;
* ``sparsekit.json``: for every module that differs from what the config builds, its class and constructor
  arguments, plus module attributes to restore (e.g. an attention layer's head counts);
* the tokenizer and ``report.json`` when given.

``load_compressed(DIR)`` builds the architecture from the config, swaps in the recorded modules, restores
the attributes, loads the state dict strictly and re-ties shared tensors. When ``sparsekit.json`` records no
module and no attribute (every shape and head count matches the config), the folder is also a plain
transformers checkpoint that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads.

A module class takes part by ``@register_compressed_module`` and two methods: ``compressed_spec(self) ->
dict`` (JSON-able constructor arguments) and ``from_compressed_spec(cls, spec, dtype, device)`` (an empty
module of the right shapes; its tensors must all be parameters or persistent buffers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn

from .checkpoint import atomic_output_dir

__all__ = ["register_compressed_module", "save_compressed", "load_compressed", "count_parameters", "config_builds",
           "compressed_modules", "compressed_layers_error",
           "FORMAT_VERSION", "MANIFEST"]

FORMAT_VERSION = 1
MANIFEST = "sparsekit.json"
WEIGHTS = "model.safetensors"
# The weights of a folder that from_pretrained cannot rebuild: under another name, so that from_pretrained fails
# with "no file named model.safetensors" instead of loading the config's shapes with every mismatched layer
# freshly (randomly) initialised, which transformers only reports in a load log.
WEIGHTS_SPARSEKIT_ONLY = "sparsekit_model.safetensors"

_REGISTRY: dict[str, type] = {}


def register_compressed_module(cls: type) -> type:
    """Class decorator: ``save_compressed`` records instances of ``cls`` and ``load_compressed`` rebuilds them."""
    for meth in ("compressed_spec", "from_compressed_spec"):
        if not hasattr(cls, meth):
            raise TypeError(f"{cls.__name__} must define {meth}() to be registered as a compressed module")
    _REGISTRY[cls.__name__] = cls
    return cls


# Plain torch modules that contextual pruning shrinks: rebuilt from their shapes.
def _linear_spec(m: nn.Linear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _embedding_spec(m: nn.Embedding) -> dict:
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx}


_PLAIN: dict[str, tuple[type, Callable[[nn.Module], dict]]] = {
    "Linear": (nn.Linear, _linear_spec),
    "Embedding": (nn.Embedding, _embedding_spec),
}


def _spec_of(m: nn.Module) -> tuple[str, dict] | None:
    name = type(m).__name__
    if name in _REGISTRY and isinstance(m, _REGISTRY[name]):
        return name, m.compressed_spec()
    if type(m) in (nn.Linear, nn.Embedding):
        return name, _PLAIN[name][1](m)
    return None


def _build(kind: str, spec: dict, dtype: torch.dtype, device) -> nn.Module:
    if kind in _REGISTRY:
        return _REGISTRY[kind].from_compressed_spec(spec, dtype=dtype, device=device)
    if kind in _PLAIN:
        return _PLAIN[kind][0](**spec, dtype=dtype, device=device)
    if kind in ("SparseLinear", "LowRankLinear"):  # registered when their module is imported
        from . import nn as _sk_nn  # noqa: F401

        if kind in _REGISTRY:
            return _REGISTRY[kind].from_compressed_spec(spec, dtype=dtype, device=device)
    raise ValueError(f"{MANIFEST} names a module class '{kind}' that sparsekit does not know "
                     f"(known: {', '.join(sorted(set(_REGISTRY) | set(_PLAIN)))})")


def count_parameters(model: nn.Module) -> int:
    """Numbers stored by the model: parameters and persistent buffers, each shared tensor counted once.

    Packed sparse and low-rank layers hold their weights partly in buffers (values, index codes); those
    count too, so this is the size that matters for memory, not ``sum(p.numel())`` of a dense model.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total


_ATTR_NAMES = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim", "num_attention_heads")


def _reference(config) -> tuple[dict[str, tuple[str, dict]], dict[str, dict]]:
    """What the config builds, from one model on the meta device (no memory): the class and spec of every
    Linear/Embedding, and the integer head-count attributes of every module that has them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    shapes, attrs = {}, {}
    for name, m in ref.named_modules():
        s = _spec_of(m)
        if s is not None:
            shapes[name] = s
        found = {k: getattr(m, k) for k in _ATTR_NAMES if isinstance(getattr(m, k, None), int)}
        if found:
            attrs[name] = found
    return shapes, attrs


def _module_attributes(model: nn.Module, ref_model_attrs: dict[str, dict]) -> dict[str, dict]:
    """Integer attributes of modules (head counts) that differ from what the config builds."""
    out = {}
    for name, m in model.named_modules():
        want = ref_model_attrs.get(name)
        if want is None:
            continue
        diff = {k: getattr(m, k) for k in want if getattr(m, k, None) != want[k]}
        if diff:
            out[name] = diff
    return out


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with every shared storage kept once; returns (tensors, {dropped_name: kept_name})."""
    sd = model.state_dict()
    kept: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in kept:
            tied[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, tied


def compressed_modules(module: nn.Module) -> dict[str, str]:
    """Qualified name -> class name of every registered compressed module (``SparseLinear``, ``LowRankLinear``)
    inside ``module``."""
    return {name: type(m).__name__ for name, m in module.named_modules()
            if type(m).__name__ in _REGISTRY and isinstance(m, _REGISTRY[type(m).__name__])}


def compressed_layers_error(module: nn.Module, what: str) -> str | None:
    """A one-line reason that ``what`` (a command or step) needs plain nn.Linear layers, naming the first
    compressed layer of ``module``; None when it has none."""
    packed = compressed_modules(module)
    if not packed:
        return None
    name, kind = next(iter(packed.items()))
    return (f"the model has {len(packed)} compressed layers ({kind} at {name}, as `sparsekit laser` and "
            f"--save-compressed write them); {what} works on plain nn.Linear layers: run it on the dense model "
            "first")


def _differences(model: nn.Module, config) -> tuple[dict, dict]:
    """The modules (class and spec) and module attributes (head counts) of ``model`` that differ from what
    ``config`` builds."""
    ref, ref_attrs = _reference(config)
    modules = {}
    for name, m in model.named_modules():
        s = _spec_of(m)
        if s is None:
            continue
        if s != ref.get(name):
            modules[name] = {"class": s[0], "spec": s[1]}
    return modules, _module_attributes(model, ref_attrs)


def config_builds(model: nn.Module) -> bool:
    """Whether ``AutoModelForCausalLM.from_config(model.config)`` builds ``model``'s structure: the same linear and
    embedding shapes, no compressed module classes, the same head counts. Where it does not, only
    ``save_compressed`` keeps the model (``save_pretrained`` would write a folder that from_pretrained loads
    with the mismatched layers re-initialised)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    modules, attributes = _differences(model, config)
    return not modules and not attributes


def save_compressed(model: nn.Module, path: str, tokenizer=None, report: dict | None = None,
                    overwrite: bool = False, extra: dict | None = None) -> dict:
    """Write ``model`` (with compressed or shrunk modules) to ``path`` atomically; return the manifest.

    ``extra`` is stored in the manifest under ``"extra"`` (e.g. a vocabulary map).
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no transformers config; save_compressed needs a "
                        "transformers model")
    modules, attributes = _differences(model, config)
    tensors, tied = _dedup_state_dict(model)
    dtype = next(model.parameters()).dtype
    plain = not modules and not attributes
    weights = WEIGHTS if plain else WEIGHTS_SPARSEKIT_ONLY
    manifest = {"format_version": FORMAT_VERSION, "dtype": str(dtype).replace("torch.", ""),
                "modules": modules, "attributes": attributes, "tied": tied, "weights": weights,
                "plain_transformers_loadable": plain}
    if extra:
        manifest["extra"] = extra
    with atomic_output_dir(path, overwrite) as tmp:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except ValueError:  # an invalid generation config must not block saving the weights
                pass
        save_file(tensors, os.path.join(tmp, weights), metadata={"format": "pt"})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return manifest


def _match_saved_dtypes(model: nn.Module, state: dict) -> None:
    """Give each floating parameter and buffer the dtype it was saved in (a model is built in one dtype; a
    float32 head or layer in a bfloat16 model must come back float32, not rounded)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        saved = state.get(name)
        if saved is not None and saved.is_floating_point() and t.is_floating_point() and saved.dtype != t.dtype:
            t.data = t.data.to(saved.dtype)


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make the parameters saved once (``tied``: dropped name -> kept name) one Parameter again."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for dropped, kept in tied.items():
        a, b = params.get(dropped), params.get(kept)
        if a is None or b is None or a is b:
            continue
        owner, _, attr = dropped.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, b)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_compressed(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    **from_config_kwargs):
    """Rebuild a model saved by ``save_compressed`` (eval mode, on ``device``).

    ``from_config_kwargs`` go to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation="eager"``).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str):  # checked before anything is read
        if dtype not in _DT:
            raise ValueError(f"dtype must be one of {', '.join(_DT)} (or a torch dtype), got {dtype!r}")
        dtype = _DT[dtype]
    if dtype is not None and dtype not in _DT.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (the packed kernels' dtypes), got {dtype}")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path} holds no {MANIFEST}: not a folder written by sparsekit.save_compressed")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: format_version {manifest.get('format_version')} is not supported "
                         f"(this sparsekit reads {FORMAT_VERSION})")
    saved_dtype = _DT[manifest["dtype"]]
    config = AutoConfig.from_pretrained(path)
    # Built for real (not on the meta device) so that non-persistent buffers such as rotary frequencies are
    # computed by the architecture's own code; the weights are then overwritten by the checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype, **from_config_kwargs)
    for name, entry in manifest["modules"].items():
        _set_module(model, name, _build(entry["class"], entry["spec"], saved_dtype, "cpu"))
    for name, attrs in manifest.get("attributes", {}).items():
        mod = model.get_submodule(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
    weights = manifest.get("weights", WEIGHTS)  # folders written before the twelfth session: model.safetensors
    if weights not in (WEIGHTS, WEIGHTS_SPARSEKIT_ONLY):
        raise ValueError(f"{mpath}: unknown weights file {weights!r}")
    state = load_file(os.path.join(path, weights))
    tied = manifest.get("tied", {})
    for dropped, kept in tied.items():
        state[dropped] = state[kept]
    _match_saved_dtypes(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not match the rebuilt model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    _retie(model, tied)
    if dtype is not None and dtype != saved_dtype:
        model = model.to(dtype)
    return model.to(device).eval()
