"""Time sparsekit::nm_linear for every half-density N:M pattern (1:2, 2:4, 4:8, 8:16) against dense
``torch.nn.functional.linear`` on the same pruned weight, in one process, on the CPU.

    python benchmarks/bench_nm_patterns_cpu.py --threads 2                     # about 4 minutes
    python benchmarks/bench_nm_patterns_cpu.py --threads 1 --dtypes bfloat16 --rows 16 24

The four patterns keep half the weights and run the same vector kernels; they differ in the index code width
(2 bits for M <= 4, else 4: bfloat16 moves 1.125 bytes per weight for 1:2 and 2:4, 1.25 for 4:8 and 8:16) and in
how the panel path (bfloat16, 9-128 rows) decodes a group. ``SparseLinear``'s dispatch tables
(``CPU_SPARSE_MAX_ROWS``) take a pattern's limits from this run. Timing as bench_sparse_linear_cpu.py: median of
single calls, dense and the patterns taking turns in rounds, each cycling through enough copies of its weight to
overflow the last-level cache. Writes benchmarks/results/nm_patterns_cpu_<threads>t.{md,csv} (``--out``).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.nn.functional as F
from bench_sparse_linear_cpu import interleaved_medians_ms, l3_bytes  # benchmarks/ (scripts run from there)
from machine import DTYPES, RESULTS, cpu_name, doc_parser, write_md_csv

import sparsekit
from sparsekit import ops
from sparsekit.formats import nm_index_codes, pack_nm

SHAPES = {
    "llama3-8b.attn.q/o": (4096, 4096),
    "llama3-8b.mlp.up/gate": (14336, 4096),
    "smollm2-135m.mlp.up/gate": (1536, 576),
}
PATTERNS = ((1, 2), (2, 4), (4, 8), (8, 16))
MAX_COPIES = 256


def main() -> None:
    ap = doc_parser(__doc__)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 24, 32, 64], help="M values, rows of x")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per case and variant")
    ap.add_argument("--note", default="", help="a line added to the markdown header")
    ap.add_argument("--out", default=None, help="path stem for .md/.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cold = 3 * l3_bytes()
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now()
    rows_out = []
    for dname in args.dtypes:
        dt = DTYPES[dname]
        for sname in args.shapes:
            out_f, in_f = SHAPES[sname]
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
            copies_of = {}
            dense_bytes = out_f * in_f * torch.empty((), dtype=dt).element_size()
            copies_of["dense"] = [w.to(dt).clone() for _ in range(max(1, min(MAX_COPIES, -(-cold // dense_bytes))))]
            for n, m in PATTERNS:
                p = pack_nm((w * ops.nm_mask(w.abs(), n, m)).to(dt), n, m)
                v, c = p.values, nm_index_codes(p.indices, m)
                count = max(1, min(MAX_COPIES, -(-cold // (v.numel() * v.element_size() + c.numel()))))
                copies_of[f"{n}:{m}"] = [(v.clone(), c.clone()) for _ in range(count)]
            for rows in args.rows:
                x = torch.randn(rows, in_f).to(dt)
                fns = {"dense": lambda k: F.linear(x, copies_of["dense"][k])}
                for n, m in PATTERNS:
                    cl = copies_of[f"{n}:{m}"]
                    fns[f"{n}:{m}"] = (lambda cl, n, m: lambda k: ops.nm_linear(x, cl[k][0], cl[k][1], n, m, in_f))(
                        cl, n, m)
                ms = interleaved_medians_ms(fns, {k: len(v) for k, v in copies_of.items()}, rounds=3,
                                            min_time=args.min_time, min_reps=15)
                row = {"shape": sname, "out_x_in": f"{out_f}x{in_f}", "dtype": dname, "M": rows,
                       "dense_ms": round(ms["dense"], 4)}
                for n, m in PATTERNS:
                    row[f"{n}:{m}_ms"] = round(ms[f"{n}:{m}"], 4)
                    row[f"{n}:{m}_speedup"] = round(ms["dense"] / ms[f"{n}:{m}"], 3)
                rows_out.append(row)
                print(f"{dname:8s} {sname:26s} M={rows:3d} dense {ms['dense']:.3f} ms  "
                      + "  ".join(f"{n}:{m} {row[f'{n}:{m}_speedup']:.2f}x" for n, m in PATTERNS), flush=True)
    wall = (datetime.datetime.now() - started).total_seconds()
    header = [
        "# nm_linear by N:M pattern on cpu: speedup over dense F.linear",
        "",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {threads} torch threads",
        f"- torch {torch.__version__}, sparsekit {sparsekit.__version__}",
        f"- date: {started.isoformat(timespec='seconds')}; wall time {wall:.0f}s",
        f"- timing: median of >= 15 single calls and >= {args.min_time}s per variant after warm-up, variants taking "
        f"turns in 3 rounds; weights cycled through copies totalling >= {cold / 2**20:.0f} MiB per variant "
        f"(at most {MAX_COPIES} copies)",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "- the op called directly (torch.ops.sparsekit.nm_linear), no bias; weights pruned by |W| per group",
    ] + ([f"- note: {args.note}"] if args.note else []) + [
        "",
        "| shape | out x in | dtype | M | dense ms | " + " | ".join(f"{n}:{m} ms (x)" for n, m in PATTERNS) + " |",
        "|---|---|---|---|---|" + "---|" * len(PATTERNS),
    ]
    for r in rows_out:
        header.append(f"| {r['shape']} | {r['out_x_in']} | {r['dtype']} | {r['M']} | {r['dense_ms']:.3f} | "
                      + " | ".join(f"{r[f'{n}:{m}_ms']:.3f} ({r[f'{n}:{m}_speedup']:.2f}x)" for n, m in PATTERNS)
                      + " |")
    md = "\n".join(header) + "\n"
    stem = args.out or os.path.join(RESULTS, f"nm_patterns_cpu_{threads}t")
    write_md_csv(stem, md, rows_out)
    print(f"wrote {stem}.md and .csv")


if __name__ == "__main__":
    main()
