"""Time the CPU paths for many rows of x (prefill) against ``F.linear`` on the dense weight, in one process, on
Llama-3-8B and SmolLM2 shapes: the packed ops as they dispatch, and decode + dense GEMM.

    python benchmarks/bench_unpack_linear_cpu.py --threads 1 --dtypes float32
    python benchmarks/bench_unpack_linear_cpu.py --threads 2 --shapes smollm2-135m.mlp.up --rows 8 512
    SPARSEKIT_CPU_STREAMED_MAX_ROWS=100000 python benchmarks/bench_unpack_linear_cpu.py ...  # streamed at every M
    SPARSEKIT_CPU_PANEL=0 python benchmarks/bench_unpack_linear_cpu.py ...  # decode + MKL, as before the 11th session

Variants, on one random weight pruned 2:4 and 4:8 by |W| per group, and 50% unstructured by |W| per row:

* ``dense``: ``F.linear`` on the 2:4-pruned weight stored dense (the baseline; its time does not depend on
  zeros);
* ``dense oneDNN`` (only with ``--onednn``): oneDNN's matmul on the same dense weight. In float32 torch's
  ``F.linear`` runs MKL's sgemm, which takes its AVX2 path on AMD CPUs; oneDNN's runs AVX-512 there (see
  bench_dense_baseline_cpu.py), so this is the faster dense baseline a float32 user could reach;
* ``nm_linear`` / ``4:8 nm_linear`` / ``bitmap_linear``: the packed ops, which run their streamed kernels up to
  ``streamed::max_rows`` rows of x (float32 on the AVX-512 lanes: 24, or 2048 with ``SPARSEKIT_CPU_PANEL=0``;
  otherwise 64; bfloat16 hands 13 rows and more to the panel path) and decode + GEMM above
  (``csrc/cpu/streamed.h``);
* ``unpack_linear`` / ``bitmap unpack_linear``: ``sparsekit::nm_unpack_linear`` / ``bitmap_unpack_linear``, what
  ``SparseLinear`` runs above its packed-kernel limits: bfloat16 up to 128 rows the panel path, otherwise blocks
  of 4-32 MiB of dense weight decoded into a reused per-thread buffer, one GEMM each (float32 with AVX-512:
  sparsekit's own, ``csrc/cpu/sgemm.h``; otherwise BLAS; ``SPARSEKIT_CPU_PANEL=0`` forces BLAS);
* ``unpack + F.linear`` (only with ``--fresh-unpack``): ``sparsekit::nm_unpack`` into a fresh dense tensor, then
  ``F.linear``, which pays a fresh (page-faulted) allocation of the whole weight on every call.

Timing as bench_sparse_linear_cpu.py (median of single calls, variants taking turns in rounds, weights cycled
through copies totalling 3x L3 so that they are read from memory). Writes
benchmarks/results/prefill_cpu_<threads>t.{csv,md} (``--out`` changes the stem; unpack_linear_cpu_*.md are this
script's earlier runs, at M = 8..512 with the packed ops streaming only up to 64 rows).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F
from bench_dense_baseline_cpu import onednn_linear
from bench_sparse_linear import SHAPES  # benchmarks/ (run from there): Llama-3-8B and SmolLM2 linears
from bench_sparse_linear_cpu import (
    DTYPES,
    interleaved_medians_ms,
    l3_bytes,
    nbytes,
)
from machine import RESULTS, cpu_name, write_md_csv

import sparsekit
from sparsekit import ops
from sparsekit.formats import nm_index_codes, pack_bitmap, pack_nm

VARIANTS = ("dense", "dense oneDNN", "nm_linear", "unpack_linear", "4:8 nm_linear", "bitmap_linear",
            "bitmap unpack_linear", "unpack + F.linear")


def make_cases(out_f: int, in_f: int, dtype, fresh_unpack: bool, onednn: bool) -> dict:
    """{variant: (tensors, fn(x, tensors))}."""
    w = torch.randn(out_f, in_f)
    w24 = (w * ops.nm_mask(w.abs(), 2, 4)).to(dtype)
    p = pack_nm(w24, 2, 4)
    nm = (p.values, nm_index_codes(p.indices, 4))
    p48 = pack_nm((w * ops.nm_mask(w.abs(), 4, 8)).to(dtype), 4, 8)
    nm48 = (p48.values, nm_index_codes(p48.indices, 8))
    wb = (w * ops.rowwise_prune_mask(w.abs(), in_f // 2)).to(dtype)
    b = pack_bitmap(wb)
    bm = (b.bitmask, b.values, b.row_offsets)
    sk = torch.ops.sparsekit
    cases = {
        "dense": ((w24,), lambda x, t: F.linear(x, t[0])),
        "nm_linear": (nm, lambda x, t: sk.nm_linear(x, t[0], t[1], 2, 4, in_f, None)),
        "unpack_linear": (nm, lambda x, t: sk.nm_unpack_linear(x, t[0], t[1], 2, 4, in_f, None)),
        "4:8 nm_linear": (nm48, lambda x, t: sk.nm_linear(x, t[0], t[1], 4, 8, in_f, None)),
        "bitmap_linear": (bm, lambda x, t: sk.bitmap_linear(x, t[0], t[1], t[2], in_f, None)),
        "bitmap unpack_linear": (bm, lambda x, t: sk.bitmap_unpack_linear(x, t[0], t[1], t[2], in_f, None)),
    }
    if onednn:
        cases["dense oneDNN"] = ((w24,), lambda x, t: onednn_linear(x, t[0]))
    if fresh_unpack:
        cases["unpack + F.linear"] = (nm, lambda x, t: F.linear(x, sk.nm_unpack(t[0], t[1], 2, 4, in_f)))
    return cases


def render_markdown(rows: list[dict], header: list[str]) -> str:
    shown = [v for v in VARIANTS[1:] if any(r["variant"] == v for r in rows)]
    lines = header + [
        "| shape | out x in | dtype | M | dense ms | " + " | ".join(f"{v} ms (x)" for v in shown) + " |",
        "|---|---|---|---|---|" + "---|" * len(shown),
    ]
    table = {}
    for r in rows:
        table.setdefault((r["shape"], r["out_features"], r["in_features"], r["dtype"], r["M"]), {})[r["variant"]] = r
    for (name, out_f, in_f, dt, m), vr in table.items():
        cells = [f"{vr['dense']['ms']:.3f}"]
        cells += [f"{vr[v]['ms']:.3f} ({vr[v]['speedup']:.2f}x)" if v in vr else "–" for v in shown]
        lines.append(f"| {name} | {out_f}x{in_f} | {dt} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048], help="M, rows of x")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=0.15, help="seconds of timed calls per case and variant")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in which the variants take turns")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--cold-bytes", type=int, default=None, help="bytes of weight copies cycled (default 3x L3)")
    ap.add_argument("--fresh-unpack", action="store_true", help="also time nm_unpack into a fresh tensor + F.linear")
    ap.add_argument("--onednn", action="store_true",
                    help="also time oneDNN's matmul on the dense weight (torch.ops.mkldnn._linear_pointwise, private; "
                    "see bench_dense_baseline_cpu.py): torch's F.linear runs MKL's sgemm in float32")
    ap.add_argument("--note", default="", help="a line added to the markdown header (e.g. machine shared)")
    ap.add_argument("--out", default=None, help="path stem for .csv/.md")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(RESULTS, f"prefill_cpu_{torch.get_num_threads()}t")
    cold = 3 * l3_bytes() if args.cold_bytes is None else args.cold_bytes
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    torch.manual_seed(0)
    rows_out = []
    for name in args.shapes:
        out_f, in_f = SHAPES[name]
        for dtype_name in args.dtypes:
            cases = make_cases(out_f, in_f, DTYPES[dtype_name], args.fresh_unpack, args.onednn)
            copies = {}
            for v, (tensors, _) in cases.items():
                n = max(1, min(16, -(-cold // nbytes(*tensors)))) if cold else 1
                copies[v] = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]
            for m in args.rows:
                x = torch.randn(m, in_f).to(DTYPES[dtype_name])
                fns = {v: (lambda k, fn=fn, c=copies[v]: fn(x, c[k])) for v, (_, fn) in cases.items()}
                with torch.inference_mode():
                    timed = interleaved_medians_ms(fns, {v: len(copies[v]) for v in fns}, args.rounds,
                                                   args.min_time, args.min_reps)
                for v, ms in timed.items():
                    rows_out.append(dict(shape=name, out_features=out_f, in_features=in_f, dtype=dtype_name, M=m,
                                         variant=v, ms=round(ms, 4), speedup=round(timed["dense"] / ms, 3)))
                print(f"{name} {dtype_name} M={m}: " + ", ".join(f"{v} {ms:.3f}ms" for v, ms in timed.items()),
                      flush=True)
            del cases, copies
    load_after = os.getloadavg()[0]

    header = [
        "# Many rows of x on CPU: the packed ops and decode + dense GEMM vs dense F.linear",
        "",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, sparsekit {sparsekit.__version__}; CPU C++ backend: "
        f"{sparsekit.backend_status()['cpu'].detail}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"wall time {time.perf_counter() - t_start:.0f}s",
        f"- timing: median of >= {args.min_reps} single calls and >= {args.min_time}s per variant after warm-up, "
        f"variants taking turns in {args.rounds} rounds; weights cycled through copies totalling >= "
        f"{cold / 2**20:.0f} MiB per variant (at most 16 copies; cold caches)",
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"
        + ("  **(machine busy: > 2.5 on 2 cores, numbers are noisy)**" if max(load_before, load_after) > 2.5 else ""),
        "- (x) = dense ms / variant ms (dense = F.linear; dense oneDNN, when shown, = oneDNN's matmul on the same "
        "dense weight). Weights: 2:4 and 4:8 by |W| per group, bitmap 50% by |W| per row; no bias",
        f"- SPARSEKIT_CPU_STREAMED_MAX_ROWS: {os.environ.get('SPARSEKIT_CPU_STREAMED_MAX_ROWS', 'unset')} (unset: the "
        "ops' own limits: float32 24 rows with sparsekit's AVX-512 GEMM above, 2048 with SPARSEKIT_CPU_PANEL=0; 64 "
        "otherwise, bfloat16 from 13 / 25 rows on the panel path)",
        f"- SPARSEKIT_CPU_PANEL: {os.environ.get('SPARSEKIT_CPU_PANEL', 'unset')} (0: decode + BLAS, MKL's sgemm for "
        "float32, instead of sparsekit's GEMMs)",
    ] + ([f"- note: {args.note}"] if args.note else []) + [""]
    md = render_markdown(rows_out, header)
    write_md_csv(out, md, rows_out)
    print(md)
    print(f"wrote {out}.csv and {out}.md")


if __name__ == "__main__":
    main()
