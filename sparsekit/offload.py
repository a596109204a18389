"""Prune models larger than memory: one decoder layer at a time, read from and written to safetensors.

``sparsekit prune --offload`` (or :class:`OffloadedModel` from Python) never holds the whole model:

* the model is built from its config with every *parameter* on the meta device (buffers, such as rotary
  frequencies, are built normally: they are small and often not in the checkpoint);
* the parameters outside the decoder layers (embeddings, final norm, LM head) are read only while they are
  needed: to capture the first layer's inputs, and for the LM head at the end of an evaluation;
* each decoder layer is read from the checkpoint, calibrated, pruned, run on the calibration activations
  (so the next layer sees the pruned layer's outputs, as in the in-memory run), written to its own
  safetensors shard of the output, and dropped back to the meta device.

Tensors are read with plain file reads at the offsets the safetensors header gives, not through a memory
map: the pages of a layer that was read do not stay in the process's resident set afterwards. Peak memory is
therefore about one layer (or the largest outer tensor group) plus the calibration activations: two buffers
of (nsamples, seqlen, hidden) in the model's dtype. With ``activations_device="cpu"`` those buffers stay in
host memory while the layer runs on the GPU.

The output folder is a normal sharded Hugging Face checkpoint (``model.safetensors.index.json``, one shard
per decoder layer and per outer tensor, the input's tensor names and dtype); it loads with
``AutoModelForCausalLM.from_pretrained``. It is written atomically (``sparsekit.checkpoint``).

Perplexity under offload runs the same way (layer by layer, then the LM head through the model's own
forward with the decoder layers replaced by a replay of the computed hidden states), so a model that does
not fit in memory still gets its dense and pruned perplexity.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["SafetensorsFolder", "OffloadedModel", "LayerReader", "OffloadWriter", "OffloadError", "peak_rss_bytes",
           "parameters_on_meta"]


class OffloadError(ValueError):
    """The model folder cannot be pruned layer by layer (no safetensors, a missing tensor, ...)."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFolder:
    """The tensors of a folder holding ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    Only the headers are read on construction; :meth:`read` reads one tensor with ``readinto`` at its
    offset (no mmap), so memory is the tensor itself.
    """

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise OffloadError(f"{folder} has neither model.safetensors nor model.safetensors.index.json: "
                               "--offload reads safetensors checkpoints (save the model with "
                               "save_pretrained(..., safe_serialization=True) first)")
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, e in header.items():
                if e["dtype"] not in _ST_DTYPES:
                    raise OffloadError(f"{path}: tensor {key} has dtype {e['dtype']}, which sparsekit cannot read")
                start, end = e["data_offsets"]
                self.entries[key] = (path, _ST_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + start, end - start)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def nbytes(self) -> int:
        return sum(e[4] for e in self.entries.values())

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` in its stored dtype, on the CPU, in freshly allocated memory."""
        path, dtype, shape, offset, nbytes = self.entries[key]
        t = torch.empty(shape, dtype=dtype)
        if nbytes != t.numel() * t.element_size():
            raise OffloadError(f"{path}: tensor {key} has {nbytes} bytes for shape {shape} {dtype}")
        if nbytes:
            buf = t.reshape(-1).view(torch.uint8).numpy()
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(buf))
            if got != nbytes:
                raise OffloadError(f"{path}: tensor {key} is truncated ({got} of {nbytes} bytes)")
        return t


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device (buffers are built normally)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    glibc raises its mmap threshold as large blocks are freed, after which layer-sized tensors come from the
    heap, and a dropped layer's pages stay in the resident set: measured +70-100 MB per layer of a 2.4 GB
    model without this (1.9 GB peak). Trimming after each dropped layer keeps the process at one layer.
    (A fixed low mmap threshold does the same but makes every temporary over it a fresh mmap: SparseGPT's
    per-column updates ran 2.7x slower.)"""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - AttributeError where libc has none
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class _Replay(nn.Module):
    """Stands in for a decoder layer: the last one returns the precomputed final hidden states."""

    def __init__(self, final: torch.Tensor | None, state: dict, tuple_len: int | None):
        super().__init__()
        self.final, self.state, self.tuple_len = final, state, tuple_len

    def forward(self, hidden_states=None, *args, **kwargs):
        if self.final is None:  # not the last layer: pass the input through
            h = hidden_states
        else:
            b = hidden_states.shape[0]
            pos = self.state["pos"]
            h = self.final[pos: pos + b].to(hidden_states.device)
            self.state["pos"] = pos + b
        if self.tuple_len is None:
            return h
        return (h,) + (None,) * (self.tuple_len - 1)


class OffloadedModel:
    """A causal LM whose parameters stay on disk until a layer needs them.

    folder: a Hugging Face folder with safetensors weights. dtype: compute and output dtype (the stored
    tensors are converted on read). device: where layers run. activations_device: where the calibration
    activations live (default: ``device``; "cpu" keeps them in host memory while layers run on a GPU).
    """

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 activations_device: str | torch.device | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import find_decoder_layers

        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise OffloadError(f"{folder} has no config.json: --offload needs a local Hugging Face folder")
        self.folder = folder
        self.reader = SafetensorsFolder(folder)
        self._lazy_outer = True
        self.dtype = dtype
        self.device = torch.device(device)
        self.activations_device = torch.device(activations_device) if activations_device else self.device
        config = AutoConfig.from_pretrained(folder)
        with parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self._use_cache = getattr(config, "use_cache", True)
        self.model.config.use_cache = False
        if self.device.type != "cpu":
            self.model.to(self.device)  # buffers; parameters are meta
        self.layers = find_decoder_layers(self.model)
        prefix = next(n for n, m in self.model.named_modules() if m is self.layers)
        # Parameter groups (tied parameters share one group) -> checkpoint key.
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        base = getattr(self.model, "base_model_prefix", "")
        self._key: dict[str, str] = {}  # first name of a group -> checkpoint key
        self._names: dict[str, list[str]] = {}  # first name of a group -> every module path of the parameter
        missing = []
        for names in groups.values():
            key = next(filter(None, (self._ckpt_key(n, base) for n in names)), None)
            if key is None:
                missing.append(names[0])
                continue
            self._key[names[0]] = key
            self._names[names[0]] = names
        if missing:
            raise OffloadError(f"{folder}: the checkpoint has no tensor for {len(missing)} parameter(s) of "
                               f"{type(self.model).__name__}, e.g. {missing[:3]}")
        self._layer_params: list[list[str]] = [[] for _ in self.layers]
        self._outer: list[str] = []
        for first in self._key:
            i = _layer_index(first, prefix, len(self.layers))
            (self._outer if i is None else self._layer_params[i]).append(first)
        self.outer_keys = [self._key[n] for n in self._outer]

    def _ckpt_key(self, name: str, base: str) -> str | None:
        if name in self.reader:
            return name
        if base and name.startswith(base + ".") and name[len(base) + 1:] in self.reader:
            return name[len(base) + 1:]
        if base and f"{base}.{name}" in self.reader:
            return f"{base}.{name}"
        return None

    # -- moving parameters between disk and memory ------------------------------------------------------
    def _slot(self, name: str) -> tuple[nn.Module, str]:
        """(module, attribute) holding the parameter called ``name``."""
        mod_name, _, pname = name.rpartition(".")
        return self.model.get_submodule(mod_name), pname

    def _set(self, first: str, tensor: torch.Tensor | None) -> None:
        """Give every module path of parameter group ``first`` one new Parameter: ``tensor``, or a meta
        placeholder when ``tensor`` is None (tied parameters stay one object)."""
        mod, pname = self._slot(first)
        old = mod._parameters[pname]
        if tensor is None:
            tensor = torch.empty(old.shape, dtype=old.dtype, device="meta")
        elif tuple(tensor.shape) != tuple(old.shape):
            raise OffloadError(f"{self.folder}: tensor {self._key[first]} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(old.shape)} for {first}")
        new = nn.Parameter(tensor, requires_grad=False)
        for name in self._names[first]:
            mod, pname = self._slot(name)
            mod._parameters[pname] = new

    def _load(self, firsts: list[str], reader: SafetensorsFolder) -> None:
        for first in firsts:
            t = reader.read(self._key[first]).to(device=self.device, dtype=self.dtype)
            self._set(first, t)

    def _release(self, firsts: list[str]) -> None:
        for first in firsts:
            self._set(first, None)
        _malloc_trim()  # also with layers on a GPU: each tensor is read through host memory

    def load_outer(self, reader: SafetensorsFolder | None = None) -> None:
        self._load(self._outer, reader or self.reader)

    def release_outer(self) -> None:
        self._release(self._outer)

    def load_layer(self, i: int, reader: SafetensorsFolder | None = None) -> None:
        self._load(self._layer_params[i], reader or self.reader)

    def release_layer(self, i: int) -> None:
        self._release(self._layer_params[i])

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Checkpoint key -> tensor of layer ``i`` (loaded), as it is written to disk."""
        out = {}
        for first in self._layer_params[i]:
            mod, pname = self._slot(first)
            out[self._key[first]] = mod._parameters[pname].data
        return out

    @property
    def parameter_bytes(self) -> int:
        """Bytes of all parameters at the compute dtype (tied ones once): the size of the model in memory."""
        size = self.dtype.itemsize
        return sum(int(torch.Size(self.reader.entries[k][2]).numel()) * size for k in set(self._key.values()))

    @contextlib.contextmanager
    def outer_on_call(self, reader: SafetensorsFolder | None = None) -> Iterator[None]:
        """Within the block, each module holding outer parameters (embedding, final norm, LM head) has them
        read from disk when it is called and dropped when it returns, so a forward holds one of them at a
        time (the embedding is gone before the LM head is read). Models that use an outer parameter without
        calling its module fall back to :meth:`load_outer` (see :meth:`_with_outer`)."""
        reader = reader or self.reader
        owner: dict[nn.Module, list[str]] = {}
        for first in self._outer:
            for name in self._names[first]:
                firsts = owner.setdefault(self._slot(name)[0], [])
                if first not in firsts:
                    firsts.append(first)
        handles = []
        for mod, firsts in owner.items():
            handles.append(mod.register_forward_pre_hook(lambda m, a, f=firsts: self._load(f, reader)))
            handles.append(mod.register_forward_hook(lambda m, a, o, f=firsts: self._release(f)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.release_outer()

    def _with_outer(self, fn, reader: SafetensorsFolder | None = None):
        """fn() with the outer parameters read on call; if the model touches one outside its module's call
        (a meta-tensor error), again with all of them loaded for the whole call."""
        if self._lazy_outer:
            try:
                with self.outer_on_call(reader):
                    return fn()
            except (NotImplementedError, RuntimeError) as e:
                if "meta" not in str(e):
                    raise
                self._lazy_outer = False
        self.load_outer(reader)
        try:
            return fn()
        finally:
            self.release_outer()

    @torch.no_grad()
    def capture_inputs(self, windows: torch.Tensor, reader: SafetensorsFolder | None = None):
        """The first decoder layer's inputs for ``windows`` (``sparsekit.calibrate.LayerInputs``), with the
        outer parameters read only while their modules run; the hidden states go to ``activations_device``."""
        from .calibrate import capture_layer_inputs

        inputs = self._with_outer(lambda: capture_layer_inputs(self.model, self.layers, windows, self.device), reader)
        inputs.hidden = inputs.hidden.to(self.activations_device)
        return inputs

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def final_hidden(self, windows: torch.Tensor, reader: SafetensorsFolder | None = None, progress: bool = False,
                     desc: str = "layers"):
        """Run ``windows`` (n, L) through every decoder layer, one loaded at a time; return (hidden, tuple_len)."""
        from tqdm.auto import tqdm

        from .calibrate import run_layer

        inputs = self.capture_inputs(windows, reader)
        scratch = torch.empty_like(inputs.hidden)
        out_kind: dict = {}

        def record(module, args, out):
            out_kind["tuple_len"] = len(out) if isinstance(out, (tuple, list)) else None

        for i in tqdm(range(len(self.layers)), desc=desc, unit="layer", disable=not progress, leave=False):
            self.load_layer(i, reader)
            handle = self.layers[i].register_forward_hook(record)
            try:
                run_layer(self.layers[i], inputs, scratch)
            finally:
                handle.remove()
                self.release_layer(i)
            inputs.hidden, scratch = scratch, inputs.hidden
        return inputs.hidden, out_kind.get("tuple_len")

    @torch.no_grad()
    def window_nll(self, windows: torch.Tensor, reader: SafetensorsFolder | None = None, progress: bool = False,
                   desc: str = "eval") -> tuple[float, int]:
        """Sum of NLL and predicted-token count over ``windows``, as ``sparsekit.evaluate.window_nll``."""
        from .evaluate import window_nll

        final, tuple_len = self.final_hidden(windows, reader, progress, desc)
        state = {"pos": 0}
        saved = list(self.layers)
        for j in range(len(saved)):
            self.layers[j] = _Replay(final if j == len(saved) - 1 else None, state, tuple_len)

        def score():
            state["pos"] = 0  # from the first window again if the lazy attempt is retried
            return window_nll(self.model, windows, device=self.device)

        try:
            return self._with_outer(score, reader)
        finally:
            for j, layer in enumerate(saved):
                self.layers[j] = layer


def _layer_index(name: str, prefix: str, n: int) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n else None


class LayerReader:
    """``layer_io`` for ``prune_model`` and ``owl.outlier_ratios``: reads layers from ``reader`` (default: the
    model's own checkpoint) and drops each one when the caller is done with it."""

    def __init__(self, om: OffloadedModel, reader: SafetensorsFolder | None = None):
        self.om, self.source = om, reader

    def capture(self, windows: torch.Tensor):
        return self.om.capture_inputs(windows, self.source)

    def load(self, i: int) -> None:
        self.om.load_layer(i, self.source)

    def done(self, i: int) -> None:
        self.om.release_layer(i)

    def reader(self) -> "LayerReader":
        """The access for a pass that only reads the layers (OWL's): reads from the same checkpoint."""
        return LayerReader(self.om, self.source)


class OffloadWriter(LayerReader):
    """Writes an offloaded model's pruned layers into an output folder as a sharded safetensors checkpoint.

    Used as ``prune_model``'s ``layer_io``: ``load(i)`` reads layer ``i`` from the input, ``done(i)`` writes
    it to its shard and drops it. ``finish()`` copies the outer tensors (one at a time) and writes the index.
    """

    def __init__(self, om: OffloadedModel, folder: str):
        super().__init__(om)
        self.folder = folder
        n_outer = len(om.outer_keys)
        self.total = n_outer + len(om.layers)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._outer_shards = {k: self._shard_name(j + 1) for j, k in enumerate(om.outer_keys)}
        self._layer_shards = [self._shard_name(n_outer + i + 1) for i in range(len(om.layers))]

    def _shard_name(self, j: int) -> str:
        return f"model-{j:05d}-of-{self.total:05d}.safetensors"

    def _write(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(self.folder, shard), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = shard
            self.total_size += v.numel() * v.element_size()

    def done(self, i: int) -> None:
        self._write(self._layer_shards[i], self.om.layer_state(i))
        self.om.release_layer(i)

    def finish(self) -> SafetensorsFolder:
        """Copy the outer tensors, write the index; returns a reader of the written checkpoint."""
        for key, shard in self._outer_shards.items():
            self._write(shard, {key: self.om.reader.read(key).to(self.om.dtype)})
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return SafetensorsFolder(self.folder)

    def write_config(self) -> None:
        import shutil

        config = self.om.model.config
        config.use_cache = self.om._use_cache  # turned off in memory for calibration only
        config.dtype = self.om.dtype
        config.save_pretrained(self.folder)
        gen = os.path.join(self.om.folder, "generation_config.json")
        if os.path.exists(gen):
            shutil.copy(gen, os.path.join(self.folder, "generation_config.json"))
