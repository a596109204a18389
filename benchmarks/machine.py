"""What the benchmark scripts share: where results go, a --help from the script's docstring, and what they write
next to their numbers (the machine they ran on)."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # benchmarks/results
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the dtypes the benchmarks time, by name


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows the script's docstring: its first paragraph as the description, the
    rest (usage examples, what is measured) as the epilog, line breaks kept."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def gpu_bench_timer(device, warmup_ms: float, rep_ms: float):
    """The GPU benchmarks' timer, fn -> median ms: ``triton.testing.do_bench`` on CUDA; on the CPU (their
    --device cpu, a check of the script) ``smoke_bench``."""
    if torch.device(device).type != "cuda":
        return smoke_bench
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def triton_runs_on(device) -> bool:
    """Whether Triton kernels run on ``device``: compiled on CUDA, else only under TRITON_INTERPRET=1."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def smoke_bench(fn, repeats: int = 3) -> float:
    """Median wall-clock ms of ``repeats`` calls: the GPU benchmarks' timer when they run on the CPU to check
    the script itself (their --device cpu), never a speed figure."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """A torch device in words for a results header: the GPU's name and SM count, or, for any other device,
    a warning that the run only checked the script."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs)"
    return f"{device} (script check only: not a speed figure)"


def write_md_csv(stem: str, md: str, rows: list[dict]) -> None:
    """Write STEM.md (the markdown) and STEM.csv (the rows, columns from the first row), creating the folder."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
