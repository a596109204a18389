"""X^T X accumulation on CPU: a full ``addmm_``, the reference's lower block triangle, and the AVX-512 kernel.

SparseGPT's statistics engine (``sparsekit.calibrate.collect_input_stats``) accumulates, per linear group and
calibration batch, ``xtx += x^T x`` with x: (rows, C). X^T X is symmetric, so only the entries on and below
the diagonal are needed; the upper triangle is mirrored once after the layer's forward pass (timed separately,
"mirror", once per layer and group, not per batch). Variants:

* ``full addmm_``: one ``xtx.addmm_(x.T, x)`` (torch's float32 GEMM: MKL on x86 builds of torch);
* ``reference, 8 lower blocks``: ``sparsekit.ops.reference.xtx_lower_accumulate_reference_``, one addmm_ per
  block row, 0.56 of the full product's FLOPs (what runs on GPUs and on CPUs without AVX-512);
* ``kernel``: ``sparsekit.ops.xtx_lower_accumulate_`` (csrc/cpu/xtx.cpp: AVX-512 FMAs on 8 x 48 tiles that touch
  the lower triangle), what ``collect_input_stats`` runs on this CPU.

Inputs float32 (a float32 model) and bfloat16 (a bfloat16 model: the reference converts x to float32 first,
the kernel converts while packing). Shapes: SmolLM2's input widths (576: q/k/v, gate/up, o; 1536: down),
Llama-3-8B's (4096, 14336: one batch each), and batches of 512-2048 rows (one 512-token window per forward
in the default calibration). Variants are interleaved round by round (median per call over --rounds rounds),
so machine noise hits each alike. Every variant is checked against exact float64 products (after mirroring)
before it is timed. GFLOP/s count the full product's FLOPs (2 * rows * C^2) for every variant, so they compare
as speed; the triangle's own FLOPs are about half of that. Writes xtx_cpu_<threads>t.csv / .md into --out.

    .venv/bin/python benchmarks/bench_xtx.py --threads 1 [--rounds 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import DTYPES, cpu_name  # noqa: E402

from sparsekit import ops  # noqa: E402
from sparsekit.calibrate import mirror_lower_  # noqa: E402
from sparsekit.ops.reference import xtx_lower_accumulate_reference_  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Input widths of SmolLM2-135M's linear groups, by name; rows per calibration batch.
WIDTHS = {"smollm2-135m.hidden (q/k/v, gate/up, o)": 576, "smollm2-135m.mlp.down input": 1536,
          "llama3-8b.hidden (q/k/v, gate/up, o)": 4096, "llama3-8b.mlp.down input": 14336}
ROWS = {576: (512, 1024, 2048), 1536: (512, 1024, 2048), 4096: (512,), 14336: (512,)}


def xtx_full_(xtx: torch.Tensor, x: torch.Tensor) -> None:
    xf = x.float()
    xtx.addmm_(xf.t(), xf)


def time_per_call(fn, target_s: float) -> float:
    """Seconds per call of ``fn``, over enough calls to take about ``target_s``."""
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(target_s / once))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported (default 7)")
    p.add_argument("--target", type=float, default=0.05, help="seconds of calls per variant per round")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for xtx_cpu_<threads>t.csv / .md")
    p.add_argument("--max-channels", type=int, default=14336, help="skip wider inputs (default: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    rows_out = []
    for wname, channels in WIDTHS.items():
        if channels > args.max_channels:
            continue
        for rows in ROWS[channels]:
            for dname, dtype in DTYPES.items():
                x = torch.randn(rows, channels).to(dtype)
                xd = x.double()
                exact = xd.t() @ xd
                bound = 4 * (rows + 1) * 2.0**-24 * (xd.abs().t() @ xd.abs())  # float32 summation, doubled
                variants = {
                    "full addmm_": lambda xtx: xtx_full_(xtx, x),
                    "reference, 8 lower blocks": lambda xtx: xtx_lower_accumulate_reference_(xtx, x),
                    "kernel": lambda xtx: ops.xtx_lower_accumulate_(xtx, x),
                }
                for name, fn in variants.items():
                    check = torch.zeros(channels, channels)
                    fn(check)
                    mirror_lower_(check)
                    if not bool(((check.double() - exact).abs() <= bound).all()):
                        raise SystemExit(f"{name}: X^T X outside float32 summation error at {channels} x {rows}")
                del exact, bound, xd
                accs = {name: torch.zeros(channels, channels) for name in variants}
                times = {name: [] for name in variants}
                mirror_times = []
                for _ in range(args.rounds):
                    for name, fn in variants.items():
                        acc = accs[name]
                        times[name].append(time_per_call(lambda: fn(acc), args.target))
                    mirror_times.append(time_per_call(lambda: mirror_lower_(accs["full addmm_"]), args.target / 5))
                base = statistics.median(times["full addmm_"])
                mirror_ms = statistics.median(mirror_times) * 1e3
                for name, ts in times.items():
                    med = statistics.median(ts)
                    flops = 2 * rows * channels * channels
                    rows_out.append({
                        "input": wname, "channels": channels, "rows": rows, "x_dtype": dname, "variant": name,
                        "ms_per_batch": f"{med * 1e3:.3f}", "full_gemm_GFLOP/s": f"{flops / med / 1e9:.1f}",
                        "speedup_vs_full": f"{base / med:.2f}", "mirror_ms_once": f"{mirror_ms:.3f}",
                    })
                    print(f"{channels:5d} x {rows:5d} {dname:8s} {name:26s} {med * 1e3:9.3f} ms  {base / med:5.2f}x",
                          flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = f"xtx_cpu_{torch.get_num_threads()}t"
    csv_path = os.path.join(args.out, stem + ".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    lines = [
        "# X^T X accumulation on CPU: full addmm_, the reference's lower block triangle, the AVX-512 kernel",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}; median of {args.rounds} interleaved rounds; 1-minute load average at the start "
        f"{load:.2f}. GFLOP/s count the full product's 2 * rows * C^2 FLOPs for every variant (the triangle's "
        "own FLOPs are about half). Every variant was checked against exact float64 products first.",
        "",
        "| input | channels | rows | x dtype | variant | ms per batch | GFLOP/s (full-product FLOPs) | "
        "speedup vs full |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(f"| {r['input']} | {r['channels']} | {r['rows']} | {r['x_dtype']} | {r['variant']} | "
                     f"{r['ms_per_batch']} | {r['full_gemm_GFLOP/s']} | {r['speedup_vs_full']}x |")
    lines += ["", "Kernel against the reference's lower blocks, and the one-off mirror (once per layer and group):", ""]
    for r in rows_out:
        if r["variant"] != "kernel":
            continue
        ref = next(q for q in rows_out if q["variant"].startswith("reference") and
                   (q["channels"], q["rows"], q["x_dtype"]) == (r["channels"], r["rows"], r["x_dtype"]))
        lines.append(f"- {r['channels']} channels x {r['rows']} rows, {r['x_dtype']}: kernel "
                     f"{float(ref['ms_per_batch']) / float(r['ms_per_batch']):.2f}x the reference; mirror "
                     f"{r['mirror_ms_once']} ms once")
    md_path = os.path.join(args.out, stem + ".md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
