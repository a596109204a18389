"""Find out which kernel backends are live, load them, and remember why the others are not.

Nothing here queries a CUDA device: importing sparsekit on a machine without a GPU must work, and tests
must be collectable there.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass


@dataclass
class Backend:
    name: str
    live: bool
    detail: str


_STATUS: dict[str, Backend] = {}
_LOADED = False

# Ops that the Triton backend implements (sparsekit/kernels/triton). Registered on the CUDA key only when
# the CUDA C++ extension did not load: CUDA C++ wins where both exist.
TRITON_OPS = ("nm_mask", "wanda_score", "channel_sqnorm_accumulate_", "channel_stats_accumulate_", "nm_linear",
              "bitmap_linear")


def _try_import(modname: str) -> tuple[bool, str]:
    if os.environ.get("SPARSEKIT_DISABLE_EXTENSIONS", "0") not in ("", "0"):
        return False, "disabled by SPARSEKIT_DISABLE_EXTENSIONS"
    try:
        importlib.import_module(modname)
        return True, f"loaded {modname}"
    except ImportError as e:  # not built, or built against another torch
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "No module named" in msg:
            msg = (f"{modname} is not built (install with `pip install -e . --no-build-isolation --no-deps`; "
                   "SPARSEKIT_NO_EXTENSIONS=1 skips it)")
        return False, msg
    except OSError as e:
        return False, f"{modname} failed to load: {e}"


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - broken installs
        return False, f"triton failed to import: {e}"
    import torch

    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interp:
        where = "runs on the CPU interpreter (TRITON_INTERPRET=1)"
    elif torch.version.cuda:
        where = "runs on CUDA devices (registered where the CUDA C++ extension is not loaded)"
    else:
        where = "but this torch has no CUDA: kernels run only under TRITON_INTERPRET=1 (as the tests do)"
    return True, f"triton {triton.__version__}, {where}"


def _register_triton(lib) -> None:
    """Register lazily-imported Triton kernels on the CUDA key (import cost paid on first CUDA call)."""

    def make(name):
        def impl(*args):
            import torch

            from .kernels.triton import dispatch

            # Triton launches on the current device and its stream, not on the tensors' device: make that the
            # inputs' device (a tensor on cuda:1 with cuda:0 current would otherwise be read from device 0).
            device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
            if device is None:
                return getattr(dispatch, name)(*args)
            with torch.cuda.device(device):
                return getattr(dispatch, name)(*args)

        impl.__name__ = f"{name}_triton"
        return impl

    for name in TRITON_OPS:
        lib.impl(name, make(name), "CUDA")


def load(lib) -> None:
    """Load backends once. ``lib`` is the sparsekit torch.library.Library that owns the schemas."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import torch

    _STATUS["default"] = Backend("default", True, f"plain PyTorch {torch.__version__}, every device")

    ok, why = _try_import("sparsekit._C")
    _STATUS["cpu"] = Backend("CPU C++", ok, why)

    if not torch.version.cuda:
        _STATUS["cuda"] = Backend("CUDA C++", False, "this torch build has no CUDA")
    else:
        ok, why = _try_import("sparsekit._C_cuda")
        _STATUS["cuda"] = Backend("CUDA C++", ok, why)

    ok, why = _triton_status()
    _STATUS["triton"] = Backend("Triton", ok, why)
    if ok and torch.version.cuda and not _STATUS["cuda"].live:
        _register_triton(lib)


def status() -> dict[str, Backend]:
    """Backend name -> Backend(live, detail). Call after ``import sparsekit``."""
    return dict(_STATUS)
