"""Time sparsekit's GPU sparse linear kernels (sparsekit::nm_linear, sparsekit::bitmap_linear; CUDA C++ and
Triton) against cuBLAS dense ``F.linear`` on the same pruned weight, in one process, on Llama-3-8B shapes.

    python benchmarks/bench_sparse_gemv_gpu.py [--out benchmarks/results] [--rows 1,2,4,8,16,32,64,128]

Formats: 2:4 (N:M values + 2-bit codes) and bitmap at 50/70/80% unstructured sparsity, bf16; x is (M, in).
Implementations: ``dense`` (F.linear, cuBLAS), ``CUDA C++`` (torch.ops.sparsekit.*, when sparsekit._C_cuda is
loaded) and ``Triton`` (sparsekit.kernels.triton.dispatch, called directly). M = 128 is past the kernels'
64 rows: both backends decode to dense and call cuBLAS there, which is timed as is.

Timing (.library/device/METHOD.md): each implementation is checked against the dense product first. Decode
reads weights from memory, not from L2, so every implementation cycles through enough copies of its weight
to exceed 3x the L2 size; the calls over all copies are captured in one CUDA graph (no launch gaps between
them), the graph's replay is timed with ``triton.testing.do_bench`` (median; it also clears L2 before each
replay) and divided by the number of copies. A device-to-device copy gives the measured bandwidth ceiling;
GB/s counts the bytes a call must move (weight as stored, x, y) once. Writes bench_sparse_gemv_gpu.csv and
.md (device, SMs, driver, torch, CUDA, triton, date) into --out and prints the markdown.

Design targets (H100, bf16, speedup over cuBLAS): 2:4 at M=1 >= 1.5x, M=16 >= 1.4x, M=64 >= 1.1x; bitmap at
M=1 >= 1.4x (50%), 2.0x (70%), 2.6x (80%). The summary says which are met on the device it ran on.

``--device cpu --shapes tiny`` checks the script itself without a GPU (tests/test_gpu_scripts.py does): the CPU
C++ kernels stand in for the CUDA C++ ones, Triton runs only under TRITON_INTERPRET=1, timing is a wall-clock
median with no CUDA graph, and nothing it prints is a speed figure.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import RESULTS, device_name, doc_parser, gpu_bench_timer, triton_runs_on  # noqa: E402

# (out_features, in_features) of Llama-3-8B linear layers; x is (M, in_features).
SHAPES = {
    "llama3-8b.attn.q": (4096, 4096),
    "llama3-8b.mlp.up": (14336, 4096),
    "llama3-8b.mlp.down": (4096, 14336),
}
SMOKE_SHAPES = {"tiny": (96, 256)}  # --shapes tiny: a check of the script (not in the default list)
FORMATS = ("2:4", "bitmap50", "bitmap70", "bitmap80")
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
TARGETS = {("2:4", 1): 1.5, ("2:4", 16): 1.4, ("2:4", 64): 1.1,
           ("bitmap50", 1): 1.4, ("bitmap70", 1): 2.0, ("bitmap80", 1): 2.6}


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pruned_weight(fmt: str, out_f: int, in_f: int, dtype, device, generator):
    """A fresh random weight with the format's sparsity (2:4 by magnitude, bitmap by random positions)."""
    from sparsekit.ops.reference import nm_mask_reference

    w = torch.randn(out_f, in_f, device=device, generator=generator)
    if fmt == "2:4":
        w = w * nm_mask_reference(w.abs(), 2, 4)
    else:
        sparsity = int(fmt.removeprefix("bitmap")) / 100
        w[torch.rand(out_f, in_f, device=device, generator=generator) < sparsity] = 0
    return w.to(dtype)


def packed_args(fmt: str, weight):
    """The op's weight arguments, and the bytes they occupy."""
    from sparsekit.formats import nm_index_codes, pack_bitmap, pack_nm

    if fmt == "2:4":
        p = pack_nm(weight, 2, 4)
        codes = nm_index_codes(p.indices, 4)
        return (p.values, codes), _nbytes(p.values, codes)
    p = pack_bitmap(weight)
    return (p.bitmask, p.values, p.row_offsets), _nbytes(p.bitmask, p.values, p.row_offsets)


def call(fmt: str, impl, x, args, in_f):
    if fmt == "2:4":
        values, codes = args
        return impl["nm_linear"](x, values, codes, 2, 4, in_f, None)
    bitmask, values, offsets = args
    return impl["bitmap_linear"](x, bitmask, values, offsets, in_f, None)


def time_cold(fns, bench, capturable=True) -> float:
    """Median ms of one call, each call on a weight copy not in L2: fns[k]() uses copy k; one graph calls them
    all in order, and its replay time is divided by their number. capturable=False (a path that syncs with the
    host, or no GPU) times the same calls eagerly, launch gaps included."""
    for fn in fns:  # warm up: compilation, allocator, cuBLAS handles stay out of the capture
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if capturable:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return bench(graph.replay) / len(fns)

    def eager():
        for fn in fns:
            fn()
    return bench(eager) / len(fns)


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--out", default=RESULTS, help="folder for the CSV and markdown (default: benchmarks/results)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: all three on cuda); tiny: a check "
                             "of the script (the default with --device cpu)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x (M), comma-separated")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {', '.join(FORMATS)}")
    parser.add_argument("--warmup", type=float, default=10, help="do_bench warm-up, milliseconds (default 10)")
    parser.add_argument("--rep", type=float, default=50, help="do_bench repetition time, milliseconds (default 50)")
    parser.add_argument("--device", default="cuda",
                        help="torch device (default cuda; cpu only checks the script, with --shapes tiny)")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: cuda, or cpu to check the script")
    gpu = dev.type == "cuda"
    if args.shapes is None:
        args.shapes = ",".join(SHAPES) if gpu else "tiny"
    shapes = {**SHAPES, **SMOKE_SHAPES}
    for name in args.shapes.split(","):
        if name not in shapes:
            parser.error(f"unknown shape {name!r}; choose from {', '.join(shapes)}")
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            parser.error(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows takes comma-separated integers, got {args.rows!r}")
    if min(rows_list) < 1:
        parser.error(f"--rows must be >= 1, got {args.rows!r}")

    if gpu and not torch.cuda.is_available():
        print("bench_sparse_gemv_gpu.py needs a CUDA device: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}). Nothing was timed.", file=sys.stderr)
        return 1
    import triton

    import sparsekit
    from sparsekit.kernels.triton import dispatch

    bench = gpu_bench_timer(dev, args.warmup, args.rep)
    if gpu:
        props = torch.cuda.get_device_properties(dev)
        l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    else:  # a check of the script: one weight copy
        l2 = 0
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    dense_label = "dense (cuBLAS)" if gpu else "dense (F.linear)"

    impls = {}
    if gpu and sparsekit.backend_status()["cuda"].live:
        impls["CUDA C++"] = {"nm_linear": torch.ops.sparsekit.nm_linear,
                             "bitmap_linear": torch.ops.sparsekit.bitmap_linear}
    elif not gpu and sparsekit.backend_status()["cpu"].live:
        impls["CPU C++"] = {"nm_linear": torch.ops.sparsekit.nm_linear,
                            "bitmap_linear": torch.ops.sparsekit.bitmap_linear}
    if triton_runs_on(dev):
        impls["Triton"] = {"nm_linear": dispatch.nm_linear, "bitmap_linear": dispatch.bitmap_linear}

    # Bandwidth ceiling: a 1 GiB device-to-device copy, read + write bytes.
    src = torch.empty(1 << 29 if gpu else 1 << 20, dtype=torch.float16, device=dev).normal_(generator=gen)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * _nbytes(src) / (copy_ms * 1e-3) / 1e9
    del src, dst

    records = []
    failures = []

    def failed(what: str, e: Exception) -> None:  # recorded; the other rows still run and get written
        print(f"FAILED: {what}: {type(e).__name__}: {e}", flush=True)
        failures.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    for shape_name in args.shapes.split(","):
        out_f, in_f = shapes[shape_name]
        for fmt in args.formats.split(","):
            weight = pruned_weight(fmt, out_f, in_f, dtype, dev, gen)
            wargs, wbytes = packed_args(fmt, weight)
            dense_bytes = _nbytes(weight)
            dense_copies = [weight] + [weight.clone() for _ in range(max(1, -(-3 * l2 // dense_bytes)) - 1)]
            sparse_copies = [wargs] + [tuple(t.clone() for t in wargs) for _ in range(max(1, -(-3 * l2 // wbytes)) - 1)]
            for rows in rows_list:
                x = torch.randn(rows, in_f, device=dev, generator=gen).to(dtype)
                expect = F.linear(x, weight)
                io_bytes = _nbytes(x) + rows * out_f * 2
                dense_ms = time_cold([lambda w=w: F.linear(x, w) for w in dense_copies], bench, gpu)
                row = {"shape_name": shape_name, "out_features": out_f, "in_features": in_f, "format": fmt,
                       "M": rows, "impl": dense_label, "median_us": dense_ms * 1e3,
                       "GB/s": (dense_bytes + io_bytes) / (dense_ms * 1e-3) / 1e9, "speedup_vs_dense": 1.0,
                       "weight_MB": dense_bytes / 1e6}
                records.append(row)
                for impl_name, impl in impls.items():
                    try:
                        got = call(fmt, impl, x, wargs, in_f)
                    except Exception as e:  # noqa: BLE001
                        failed(f"{impl_name} {fmt} {shape_name} M={rows}", e)
                        continue
                    err = (got.float() - expect.float()).norm() / expect.float().norm()
                    if not torch.isfinite(err) or err > 1e-2:
                        print(f"WRONG RESULT: {impl_name} {fmt} {shape_name} M={rows}: relative error {err:.3g} "
                              "against F.linear; not timed", flush=True)
                        failures.append(f"{impl_name} {fmt} {shape_name} M={rows}: relative error {err:.3g}")
                        continue
                    # Triton's bitmap_linear sends more than 64 rows to the reference, whose unpack syncs.
                    capturable = gpu and not (impl_name == "Triton" and fmt != "2:4"
                                              and rows > dispatch.SPARSE_GEMV_MAX_ROWS)
                    try:
                        ms = time_cold([lambda a=a: call(fmt, impl, x, a, in_f) for a in sparse_copies], bench,
                                       capturable)
                    except Exception as e:  # noqa: BLE001 - a failed capture or launch
                        failed(f"{impl_name} {fmt} {shape_name} M={rows}, timing", e)
                        continue
                    records.append({**row, "impl": impl_name, "median_us": ms * 1e3,
                                    "GB/s": (wbytes + io_bytes) / (ms * 1e-3) / 1e9,
                                    "speedup_vs_dense": dense_ms / ms, "weight_MB": wbytes / 1e6})
                print(f"{shape_name} {fmt} M={rows}: dense {dense_ms * 1e3:.1f} us; " + ", ".join(
                    f"{r['impl']} {r['median_us']:.1f} us ({r['speedup_vs_dense']:.2f}x)"
                    for r in records if r["shape_name"] == shape_name and r["format"] == fmt and r["M"] == rows
                    and r["impl"] != dense_label), flush=True)
            del dense_copies, sparse_copies, weight, wargs
            if gpu:
                torch.cuda.empty_cache()

    # --- targets -----------------------------------------------------------------------------------
    summary = []
    for (fmt, rows), target in TARGETS.items():
        for impl_name in impls:
            hits = [r for r in records if r["format"] == fmt and r["M"] == rows and r["impl"] == impl_name]
            if not hits:
                continue
            worst = min(r["speedup_vs_dense"] for r in hits)
            best = max(r["speedup_vs_dense"] for r in hits)
            verdict = "meets" if worst >= target else "MISSES"
            summary.append(f"{impl_name} {fmt} M={rows}: {worst:.2f}x..{best:.2f}x over cuBLAS across shapes; "
                           f"{verdict} the {target}x target (set for H100)")

    # --- write ---------------------------------------------------------------------------------------
    where = (f"{props.name} ({props.multi_processor_count} SMs, L2 {l2 >> 20} MiB), driver {_driver_version()}"
             if gpu else device_name(dev))
    header = [
        f"device: {where}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, "
        f"sparsekit backends: {', '.join(k for k, b in sparsekit.backend_status().items() if b.live)}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        (f"timing: CUDA graph over weight copies totalling >= 3x L2, replay timed with triton.testing.do_bench "
         f"(median, warmup {args.warmup} ms, rep {args.rep} ms), divided by the copies; bf16; copy ceiling "
         f"{copy_gbs:.0f} GB/s (1 GiB device-to-device copy, read + write)" if gpu else
         "timing: wall-clock median of 3 eager calls, one weight copy: a check of the script, not a speed figure"),
    ]
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench_sparse_gemv_gpu.csv")
    fields = ["shape_name", "out_features", "in_features", "format", "M", "impl", "median_us", "GB/s",
              "speedup_vs_dense", "weight_MB"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})

    md = ["# Sparse GEMV on GPU: speedup over cuBLAS dense F.linear (bf16)", ""]
    md += [f"- {line}" for line in header] + [""]
    impl_names = list(impls)
    for shape_name in args.shapes.split(","):
        md += [f"## {shape_name} {shapes[shape_name]}", "",
               "| format | impl | " + " | ".join(f"M={m}" for m in rows_list) + " |",
               "|---|---|" + "---:|" * len(rows_list)]
        dense_us = {m: next((r["median_us"] for r in records if r["shape_name"] == shape_name
                             and r["impl"] == dense_label and r["M"] == m), float("nan")) for m in rows_list}
        md.append(f"| dense | {'cuBLAS' if gpu else 'F.linear'} (us) | " + " | ".join(f"{dense_us[m]:.1f}" for m in rows_list) + " |")
        for fmt in args.formats.split(","):
            for impl_name in impl_names:
                cells = []
                for m in rows_list:
                    hit = [r for r in records if r["shape_name"] == shape_name and r["format"] == fmt
                           and r["impl"] == impl_name and r["M"] == m]
                    cells.append(f"{hit[0]['speedup_vs_dense']:.2f}x" if hit else "-")
                md.append(f"| {fmt} | {impl_name} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["## Targets", ""] + [f"- {line}" for line in summary] + [""]
    if failures:
        md += ["## WRONG RESULTS OR FAILURES (not timed)", ""] + [f"- {line}" for line in failures] + [""]
    md_path = os.path.join(args.out, "bench_sparse_gemv_gpu.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {csv_path} and {md_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
