"""X^T X accumulation on CPU: one full ``addmm_`` against computing only the lower block triangle.

SparseGPT's statistics engine (``sparsekit.calibrate.collect_input_stats``) accumulates, per linear group and
calibration batch, ``xtx += x^T x`` with x: (rows, C) float32. X^T X is symmetric, so only the blocks on and
below the diagonal are needed: with the columns cut into k blocks, block row i is one
``xtx[cols_i, :end_i].addmm_(x[:, cols_i].T, x[:, :end_i])``, (k + 1) / 2k of the full product's FLOPs
(0.75 at k = 2, 0.625 at k = 4, 0.56 at k = 8), on smaller GEMMs. The upper triangle is mirrored once after
the layer's forward pass; its cost is timed separately ("mirror", once per layer and group, not per batch).
The triangle variants call sparsekit.calibrate's own ``accumulate_xtx_lower_`` / ``mirror_lower_`` (what
``collect_input_stats`` runs, with ``xtx_lower_blocks``' default block count: 8 at these widths).

Shapes: SmolLM2's input widths (576: q/k/v, gate/up, o; 1536: down) and batches of 512-2048 rows (one
512-token window per forward in the default calibration). Variants are interleaved round by round (median
per call over --rounds rounds), so machine noise hits each alike. Every triangle variant is checked against
the full product (after mirroring) before it is timed. Writes xtx_cpu.csv and xtx_cpu.md into --out.

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
from machine import cpu_name  # noqa: E402

from sparsekit.calibrate import accumulate_xtx_lower_, mirror_lower_, xtx_lower_blocks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Input widths of SmolLM2-135M's linear groups, by name; rows per calibration batch.
WIDTHS = {"smollm2-135m.hidden (q/k/v, gate/up, o)": 576, "smollm2-135m.mlp.down input": 1536}
ROWS = (512, 1024, 2048)
BLOCK_COUNTS = (2, 3, 4, 6, 8)


def xtx_full_(xtx: torch.Tensor, x: torch.Tensor) -> None:
    xtx.addmm_(x.t(), x)


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
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for xtx_cpu.csv / xtx_cpu.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    rows_out = []
    for wname, channels in WIDTHS.items():
        for rows in ROWS:
            x = torch.randn(rows, channels)
            full = torch.zeros(channels, channels)
            xtx_full_(full, x)
            variants = {"full addmm_": lambda xtx: xtx_full_(xtx, x)}
            for k in BLOCK_COUNTS:
                bounds = xtx_lower_blocks(channels, k)
                check = torch.zeros(channels, channels)
                accumulate_xtx_lower_(check, x, bounds)
                mirror_lower_(check)
                # Same sums as the full GEMM in a different blocking: float32 rounding apart.
                torch.testing.assert_close(check, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
                name = f"lower triangle, {len(bounds)} blocks"
                if bounds == xtx_lower_blocks(channels):
                    name += " (shipped)"
                variants[name] = lambda xtx, b=bounds: accumulate_xtx_lower_(xtx, x, b)
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
                    "input": wname, "channels": channels, "rows": rows, "variant": name,
                    "ms_per_batch": f"{med * 1e3:.3f}", "full_gemm_GFLOP/s": f"{flops / med / 1e9:.1f}",
                    "speedup_vs_full": f"{base / med:.2f}", "mirror_ms_once": f"{mirror_ms:.3f}",
                })
                print(f"{channels:5d} x {rows:5d}  {name:28s} {med * 1e3:8.3f} ms  {base / med:5.2f}x", flush=True)

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "xtx_cpu.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    triangles = [r for r in rows_out if r["variant"] != "full addmm_"]
    lines = [
        "# X^T X accumulation on CPU: full addmm_ vs lower block triangle",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}; float32; median of {args.rounds} interleaved rounds; 1-minute load average at the "
        f"start {load:.2f} (a machine shared with other jobs: indicative numbers).",
        "",
        "| channels | rows | variant | ms per batch | GFLOP/s (full-product FLOPs) | speedup vs full |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(f"| {r['channels']} | {r['rows']} | {r['variant']} | {r['ms_per_batch']} | "
                     f"{r['full_gemm_GFLOP/s']} | {r['speedup_vs_full']}x |")
    lines += ["", "Per shape: the shipped block count (the default of `xtx_lower_blocks`, used by "
              "collect_input_stats), the best one, and the one-off mirror (once per layer and group, not per batch):",
              ""]
    for channels in WIDTHS.values():
        for rows in ROWS:
            shape = [r for r in triangles if r["channels"] == channels and r["rows"] == rows]
            shipped = next(r for r in shape if r["variant"].endswith("(shipped)"))
            best = max(shape, key=lambda r: float(r["speedup_vs_full"]))
            lines.append(f"- {channels} channels x {rows} rows: shipped {shipped['speedup_vs_full']}x; best "
                         f"{best['variant']} {best['speedup_vs_full']}x; mirror {shipped['mirror_ms_once']} ms once")
    md_path = os.path.join(args.out, "xtx_cpu.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
