"""Time sparsekit's CPU sparse linear kernels (sparsekit::nm_linear, sparsekit::bitmap_linear) against the
dense ``torch.nn.functional.linear`` on the same (pruned) weight, in one process, on shapes from real models.

    python benchmarks/bench_sparse_linear_cpu.py                     # everything, torch's thread count
    python benchmarks/bench_sparse_linear_cpu.py --threads 2 --shapes llama3-8b.attn.q --rows 1 --dtypes float32

Every case is timed as the median of many single calls after warm-up, dense and the sparse formats taking
turns in a few rounds so that a drifting machine (shared memory bandwidth) hits them alike. Not
torch.utils.benchmark.Timer: it runs with one thread unless told otherwise. Decode reads each layer's
weight from memory, not from cache, so each format cycles through enough copies of its weight to overflow
the last-level cache (``--cold-bytes``, default 3x L3); pass ``--cold-bytes 0`` to time a cache-resident weight.
Writes benchmarks/results/sparse_linear_cpu.csv and .md (override with --out) and prints the markdown.
Formats: 2:4 (N:M packed, 2-bit index codes) and bitmap at 50/70/80% unstructured sparsity.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
from machine import DTYPES, RESULTS, cpu_name, write_md_csv  # benchmarks/machine.py (scripts run from their folder)
import torch.nn.functional as F

import sparsekit
from sparsekit import ops
from sparsekit.formats import nm_index_codes, pack_bitmap, pack_nm

# (out_features, in_features) of linear layers of real models; x is (M, in_features).
SHAPES = {
    "llama3-8b.attn.q": (4096, 4096),
    "llama3-8b.mlp.up": (14336, 4096),
    "llama3-8b.mlp.down": (4096, 14336),
    "smollm2-135m.mlp.up": (1536, 576),
    "smollm2-135m.mlp.down": (576, 1536),
}
FORMATS = ("2:4", "bitmap50", "bitmap70", "bitmap80")


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 << 20


def interleaved_medians_ms(fns: dict, copies: dict, rounds: int, min_time: float, min_reps: int) -> dict:
    """Median single-call time of each fn, in ms. The formats take turns (``rounds`` rounds, each timing
    every format for min_time / rounds seconds), so a slow drift of the machine (memory bandwidth shared
    with other tenants, clocks) hits dense and sparse alike. Call k of a format uses its weight copy k % n."""
    for name, fn in fns.items():
        for k in range(max(3, copies[name])):  # warm-up, and every copy touched once
            fn(k % copies[name])
    samples = {name: [] for name in fns}
    count = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            taken = 0
            while taken < -(-min_reps // rounds) or time.perf_counter() - start < min_time / rounds:
                t0 = time.perf_counter()
                fn(count[name] % copies[name])
                samples[name].append(time.perf_counter() - t0)
                count[name] += 1
                taken += 1
    return {name: statistics.median(ts) * 1e3 for name, ts in samples.items()}


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_cases(out_f: int, in_f: int, dtype):
    """{format: (weight tensors, fn(x, tensors))}, every format from one random weight, pruned per format."""
    w = torch.randn(out_f, in_f)
    cases = {}
    w24 = (w * ops.nm_mask(w.abs(), 2, 4)).to(dtype)
    cases["dense"] = ((w24,), lambda x, t: F.linear(x, t[0]))
    p = pack_nm(w24, 2, 4)
    cases["2:4"] = (
        (p.values, nm_index_codes(p.indices, 4)),
        lambda x, t: torch.ops.sparsekit.nm_linear(x, t[0], t[1], 2, 4, in_f, None),
    )
    for pct in (50, 70, 80):
        wb = (w * ops.rowwise_prune_mask(w.abs(), round(pct / 100 * in_f))).to(dtype)
        b = pack_bitmap(wb)
        cases[f"bitmap{pct}"] = (
            (b.bitmask, b.values, b.row_offsets),
            lambda x, t: torch.ops.sparsekit.bitmap_linear(x, t[0], t[1], t[2], in_f, None),
        )
    return cases


def render_markdown(rows: list[dict], header: list[str]) -> str:
    """The markdown file: ``header`` lines, then one table row per (shape, dtype, M)."""
    lines = header + [
        "| shape | out x in | dtype | M | dense ms (GB/s) | 2:4 ms (x) | bitmap50 ms (x) | bitmap70 ms (x) "
        "| bitmap80 ms (x) | 2:4 / b70 GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = {}
    for r in rows:
        table.setdefault((r["shape"], r["out_features"], r["in_features"], r["dtype"], r["M"]), {})[r["format"]] = r
    for (name, out_f, in_f, dt, m), fr in table.items():
        cells = [f"{fr['dense']['ms']:.3f} ({fr['dense']['GBps']:.0f})"]
        cells += [f"{fr[f]['ms']:.3f} ({fr[f]['speedup']:.2f}x)" for f in FORMATS]
        cells.append(f"{fr['2:4']['GBps']:.0f} / {fr['bitmap70']['GBps']:.0f}")
        lines.append(f"| {name} | {out_f}x{in_f} | {dt} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8], help="M, rows of x")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per case and format")
    ap.add_argument("--rounds", type=int, default=5, help="rounds in which the formats take turns")
    ap.add_argument("--min-reps", type=int, default=30)
    ap.add_argument("--cold-bytes", type=int, default=None, help="bytes of weight copies cycled (default 3x L3)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "sparse_linear_cpu"), help="path stem for .csv/.md")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cold = 3 * l3_bytes() if args.cold_bytes is None else args.cold_bytes
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    rows_out = []
    for name in args.shapes:
        out_f, in_f = SHAPES[name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            cases = make_cases(out_f, in_f, dtype)
            copies_of = {}
            for fmt, (tensors, _) in cases.items():
                size = nbytes(*tensors)
                n = max(1, min(64, -(-cold // size))) if cold else 1
                copies_of[fmt] = (size, [tuple(t.clone() for t in tensors) for _ in range(n)])
            for m in args.rows:
                x = torch.randn(m, in_f).to(dtype)
                fns = {
                    fmt: (lambda k, fn=fn, copies=copies_of[fmt][1]: fn(x, copies[k]))
                    for fmt, (_, fn) in cases.items()
                }
                n_copies = {fmt: len(copies_of[fmt][1]) for fmt in cases}
                timed = interleaved_medians_ms(fns, n_copies, args.rounds, args.min_time, args.min_reps)
                for fmt, ms in timed.items():
                    rows_out.append(
                        dict(shape=name, out_features=out_f, in_features=in_f, dtype=dtype_name, M=m, format=fmt,
                             ms=round(ms, 4), speedup=round(timed["dense"] / ms, 3), weight_bytes=copies_of[fmt][0],
                             GBps=round(copies_of[fmt][0] / ms / 1e6, 2))
                    )
                print(f"{name} {dtype_name} M={m}: " + ", ".join(f"{f} {ms:.3f}ms" for f, ms in timed.items()),
                      flush=True)
    load_after = os.getloadavg()[0]

    live = sparsekit.backend_status()["cpu"]
    header = [
        "# sparse linear on CPU: sparsekit kernels vs dense F.linear",
        "",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, sparsekit {sparsekit.__version__}, CPU C++ backend: {live.detail}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- timing: median of >= {args.min_reps} single calls and >= {args.min_time}s per format after warm-up, "
        f"formats taking turns in {args.rounds} rounds; "
        f"weights cycled through copies totalling >= {cold / 2**20:.0f} MiB per format (cold caches)"
        if cold else "- timing: cache-resident weights (--cold-bytes 0)",
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"
        + ("  **(machine busy: > 2.5, numbers are pessimistic and noisy)**" if max(load_before, load_after) > 2.5
           else ""),
        "- dense = F.linear on the 2:4-pruned weight stored dense (F.linear's time does not depend on zeros, so it "
        "is the baseline of every format); (x) = dense ms / format ms; GB/s = weight bytes read per second. "
        "Where the dense GB/s is below the formats' GB/s, the dense kernel is not at the memory bandwidth the "
        "sparse kernels reach, and the speedup exceeds the ratio of bytes",
        "",
    ]
    md = render_markdown(rows_out, header)
    print(md)
    write_md_csv(args.out, md, rows_out)
    print(f"wrote {args.out}.csv and {args.out}.md")


if __name__ == "__main__":
    main()
