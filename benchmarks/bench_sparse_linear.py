"""Time SparseLinear (its per-call dispatch included) and the raw packed ops against dense ``F.linear``, in one
process, on the linear shapes of Llama-3-8B and SmolLM2-135M, for M = 1..128 rows of x.

    python benchmarks/bench_sparse_linear.py                           # CPU, everything (minutes)
    python benchmarks/bench_sparse_linear.py --shapes smollm2-135m.mlp.up --rows 1 8 64 --dtypes float32
    python benchmarks/bench_sparse_linear.py --device cuda             # on a GPU machine

Variants, every one on the same random weight pruned three ways (2:4 and 4:8 by |W| per group, 50% unstructured
by |W| per row for the bitmap ones; the dense baseline is the 2:4-pruned weight stored dense, since F.linear's
time does not depend on zeros):

* ``op 2:4`` / ``op 4:8`` / ``op bitmap``: ``torch.ops.sparsekit.nm_linear`` / ``bitmap_linear`` called directly;
* ``SL 2:4 unpack`` / ``SL 4:8 unpack`` / ``SL bitmap unpack``: ``SparseLinear`` with ``dense_fallback="unpack"``
  (packed weight only);
* ``SL 2:4 cache`` / ``SL bitmap cache``: ``SparseLinear`` with ``dense_fallback="cache"`` (plus a dense
  copy for the calls outside the measured sparse region).

Timing: on CPU the median of single calls after warm-up, the variants taking turns in rounds, each cycling
through copies of its weights totalling >= 3x the last-level cache (decode reads weights from memory, not
cache); the helpers are bench_sparse_linear_cpu.py's. On CUDA, the median of CUDA-event timed calls.
Writes benchmarks/results/sparse_linear_<device>_dispatch.{csv,md,png} (``--out`` changes the stem); the plot
(speedup over dense vs M) needs matplotlib and is skipped with a message without it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_sparse_linear_cpu import interleaved_medians_ms, l3_bytes  # benchmarks/ (scripts run from there)
from machine import DTYPES, RESULTS, cpu_name, write_md_csv
from torch import nn

import sparsekit
from sparsekit import ops
from sparsekit.nn import SparseLinear
from sparsekit.nn.sparse_linear import cpu_sparse_kernels_fast

# (out_features, in_features) of real models' linear layers; x is (M, in_features).
SHAPES = {
    "llama3-8b.attn.q/o": (4096, 4096),
    "llama3-8b.mlp.up/gate": (14336, 4096),
    "llama3-8b.mlp.down": (4096, 14336),
    "smollm2-135m.attn.q/o": (576, 576),
    "smollm2-135m.mlp.up/gate": (1536, 576),
    "smollm2-135m.mlp.down": (576, 1536),
}
# Copies of a variant's weights cycled so that each call reads them from memory, as in a whole model's decode
# (its layers' weights together are far larger than the last-level cache). Up to the fifth session the cap was 16,
# which left the SmolLM2 shapes' dense baseline in L3 (16 x 0.66 MiB for 576x576 bfloat16).
MAX_COPIES = 256
# 12: the streamed kernels' last bfloat16 M; 17 and 33: one row past the panel path's 16-row steps (added in the
# eighth session); 24: between
ROWS = (1, 2, 4, 8, 12, 16, 17, 24, 32, 33, 64, 128)
VARIANTS = ("dense", "op 2:4", "SL 2:4 unpack", "SL 2:4 cache", "op 4:8", "SL 4:8 unpack", "op bitmap",
            "SL bitmap unpack", "SL bitmap cache")


def make_variants(out_f: int, in_f: int, dtype, device) -> dict:
    """{variant: (object holding the weights, bytes held, fn(obj, x))}, all from one random weight."""
    w = torch.randn(out_f, in_f, device=device)
    w24 = (w * ops.nm_mask(w.abs(), 2, 4)).to(dtype)
    pruned = {"2:4": w24, "4:8": (w * ops.nm_mask(w.abs(), 4, 8)).to(dtype),
              "bitmap": (w * ops.rowwise_prune_mask(w.abs(), in_f // 2)).to(dtype)}
    out = {"dense": (w24, w24.numel() * w24.element_size(), lambda t, x: F.linear(x, t))}
    for fmt, weight in pruned.items():
        lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
        for fallback in ("unpack", "cache") if fmt != "4:8" else ("unpack",):
            layer = SparseLinear.from_linear(lin, fmt, dense_fallback=fallback)
            held = sum(b.numel() * b.element_size() for b in layer.buffers())
            out[f"SL {fmt} {fallback}"] = (layer, held, lambda t, x: t(x))
        layer = out[f"SL {fmt} unpack"][0]
        out[f"op {fmt}"] = (layer, layer.packed_bytes(), lambda t, x: t._packed_op(x))
    return out


def cuda_medians_ms(fns: dict, reps: int) -> dict:
    """Median CUDA-event time of each fn(k) in ms, variants taking turns."""
    for fn in fns.values():
        for _ in range(3):
            fn(0)
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(0)
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(ts) for name, ts in samples.items()}


def render_markdown(rows: list[dict], header: list[str]) -> str:
    lines = header + [
        "| shape | out x in | dtype | M | dense ms | " + " | ".join(f"{v} (x)" for v in VARIANTS[1:])
        + " | SL path 2:4 / 4:8 / bitmap |",
        "|---|---|---|---|---|" + "---|" * (len(VARIANTS) - 1) + "---|",
    ]
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault((r["shape"], r["out_features"], r["in_features"], r["dtype"], r["M"]), {})[r["variant"]] = r
    for (name, out_f, in_f, dt, m), vr in table.items():
        cells = [f"{vr['dense']['ms']:.3f}"] + [f"{vr[v]['ms']:.3f} ({vr[v]['speedup']:.2f}x)" for v in VARIANTS[1:]]
        cells.append(f"{vr['SL 2:4 cache']['path']} / {vr['SL 4:8 unpack']['path']} / {vr['SL bitmap cache']['path']}")
        lines.append(f"| {name} | {out_f}x{in_f} | {dt} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[dict]) -> list[str]:
    """Worst and best SparseLinear speedups per variant and dtype, over all shapes and M."""
    out = ["", "Worst / best speedup over dense, all shapes and M:", "",
           "| variant | dtype | worst (shape, M) | best (shape, M) |", "|---|---|---|---|"]
    for v in VARIANTS[1:]:
        for dt in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["variant"] == v and r["dtype"] == dt]
            if not sel:
                continue
            lo = min(sel, key=lambda r: r["speedup"])
            hi = max(sel, key=lambda r: r["speedup"])
            out.append(f"| {v} | {dt} | {lo['speedup']:.2f}x ({lo['shape']}, {lo['M']}) | "
                       f"{hi['speedup']:.2f}x ({hi['shape']}, {hi['M']}) |")
    return out


def plot(rows: list[dict], path: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no plot (pip install matplotlib, then re-run to get {path})"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(3.4 * len(shapes), 3.2 * len(dtypes)),
                             squeeze=False, sharex=True)
    styles = {"op 2:4": ("tab:blue", ":"), "SL 2:4 unpack": ("tab:blue", "--"), "SL 2:4 cache": ("tab:blue", "-"),
              "op 4:8": ("tab:green", ":"), "SL 4:8 unpack": ("tab:green", "--"),
              "op bitmap": ("tab:orange", ":"), "SL bitmap unpack": ("tab:orange", "--"),
              "SL bitmap cache": ("tab:orange", "-")}
    for i, dt in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for v, (color, ls) in styles.items():
                sel = sorted((r for r in rows if r["variant"] == v and r["dtype"] == dt and r["shape"] == shape),
                             key=lambda r: r["M"])
                if sel:
                    ax.plot([r["M"] for r in sel], [r["speedup"] for r in sel], color=color, linestyle=ls,
                            marker=".", label=v)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{shape}\n{dt}", fontsize=8)
            if j == 0:
                ax.set_ylabel("speedup over dense F.linear")
            if i == len(dtypes) - 1:
                ax.set_xlabel("M (rows of x)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=list(ROWS), help="M values, rows of x")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=0.2, help="CPU: seconds of timed calls per case and variant")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds in which the variants take turns")
    ap.add_argument("--min-reps", type=int, default=6, help="CPU: at least this many timed calls per variant")
    ap.add_argument("--reps", type=int, default=50, help="CUDA: timed calls per variant")
    ap.add_argument("--cold-bytes", type=int, default=None, help="CPU: bytes of weight copies cycled (default 3x L3)")
    ap.add_argument("--note", default="", help="a line added to the markdown header (e.g. machine shared)")
    ap.add_argument("--out", default=None, help="path stem for .csv/.md/.png "
                                                "(default benchmarks/results/sparse_linear_<device>_dispatch)")
    args = ap.parse_args()

    device = torch.device(args.device)
    out = args.out or os.path.join(RESULTS, f"sparse_linear_{device.type}_dispatch")
    if args.threads:
        torch.set_num_threads(args.threads)
    cold = (3 * l3_bytes() if args.cold_bytes is None else args.cold_bytes) if device.type == "cpu" else 0
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    torch.manual_seed(0)
    rows_out = []
    for name in args.shapes:
        out_f, in_f = SHAPES[name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            variants = make_variants(out_f, in_f, dtype, device)
            copies = {}
            for v, (obj, held, _) in variants.items():
                # a cache layer reads either its packed or its dense weight in a call: enough copies of the
                # smaller one to be cold (counting both would leave the packed one warm in L3)
                read = obj.packed_bytes() if v.startswith("SL") and v.endswith("cache") else held
                n = max(1, min(MAX_COPIES, -(-cold // max(1, read)))) if cold else 1
                copies[v] = [obj] + [copy.deepcopy(obj) for _ in range(n - 1)]
            for m in args.rows:
                x = torch.randn(m, in_f, device=device).to(dtype)
                fns = {v: (lambda k, fn=fn, objs=copies[v]: fn(objs[k % len(objs)], x))
                       for v, (_, _, fn) in variants.items()}
                with torch.inference_mode():
                    if device.type == "cuda":
                        timed = cuda_medians_ms(fns, args.reps)
                    else:
                        timed = interleaved_medians_ms(fns, {v: len(c) for v, c in copies.items()}, args.rounds,
                                                       args.min_time, args.min_reps)
                for v, ms in timed.items():
                    obj = variants[v][0]
                    path = obj.path(m, device, dtype) if isinstance(obj, SparseLinear) and v.startswith("SL") else ""
                    rows_out.append(dict(shape=name, out_features=out_f, in_features=in_f, dtype=dtype_name, M=m,
                                         variant=v, ms=round(ms, 4), speedup=round(timed["dense"] / ms, 3),
                                         bytes_held=variants[v][1], path=path))
                print(f"{name} {dtype_name} M={m}: " + ", ".join(f"{v} {ms:.3f}ms" for v, ms in timed.items()),
                      flush=True)
            del variants, copies
    load_after = os.getloadavg()[0]

    fast, why = cpu_sparse_kernels_fast()
    if device.type == "cuda":
        where = f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        timing = f"timing: median of {args.reps} CUDA-event timed calls per variant after warm-up"
    else:
        where = f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
        timing = (f"timing: median of >= {args.min_reps} single calls and >= {args.min_time}s per variant after "
                  f"warm-up, variants taking turns in {args.rounds} rounds; weights cycled through copies totalling "
                  f">= {cold / 2**20:.0f} MiB per variant (at most {MAX_COPIES} copies; cold caches)")
    header = [
        f"# SparseLinear dispatch on {device.type}: SparseLinear and raw ops vs dense F.linear",
        "",
        f"- {where}",
        f"- torch {torch.__version__}, sparsekit {sparsekit.__version__}; "
        f"backends: {', '.join(f'{k}: {v.detail}' for k, v in sparsekit.backend_status().items())}",
        f"- CPU sparse kernels fast here: {fast} ({why})",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; wall time {time.perf_counter() - t_start:.0f}s",
        f"- {timing}",
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"
        + ("  **(machine busy: > 2.5 on 2 cores, numbers are noisy and pessimistic)**"
           if max(load_before, load_after) > 2.5 and device.type == "cpu" else ""),
        "- dense = F.linear on the pruned weight stored dense; (x) = dense ms / variant ms; op = the packed op "
        "called directly; SL = SparseLinear (checks and dispatch included) with dense_fallback unpack or cache; "
        "weights: 2:4 and 4:8 by |W| per group, bitmap 50% by |W| per row; no bias",
        "- SL path: the path SparseLinear takes for that M (2:4 and bitmap: the cache layer; 4:8: the unpack one): "
        "sparse = packed kernel, dense = cached F.linear, unpack = the decode + GEMM op (nm_unpack_linear / "
        "bitmap_unpack_linear; the layers with unpack take it wherever the cache ones take dense)",
    ] + ([f"- note: {args.note}"] if args.note else []) + [""]
    md = render_markdown(rows_out, header) + "\n".join(summary_lines(rows_out)) + "\n"
    write_md_csv(out, md, rows_out)
    print(md)
    print(plot(rows_out, out + ".png", f"SparseLinear vs dense F.linear\n{where}; torch {torch.__version__}"))
    print(f"wrote {out}.csv and {out}.md")


if __name__ == "__main__":
    main()
