"""The dense baselines on CPU: torch.nn.functional.linear against oneDNN's own matmul, same weights, same run.

sparsekit's CPU speed figures are ratios against ``F.linear`` on the dense weight (what an ``nn.Linear`` runs).
For float32, torch's x86 CPU builds send that to MKL's sgemm; for bfloat16 to oneDNN. On AMD CPUs MKL takes its
AVX2 path, so a float32 dense layer can be faster through oneDNN, which torch reaches with
``torch.ops.mkldnn._linear_pointwise`` (a private op, used by torch.compile's CPU backend when it freezes weights).
This script measures how much faster, so that every float32 ratio in the README can be read against both.

Shapes from real models (Llama-3-8B, SmolLM2-135M); M rows of x; median of --repeats interleaved calls after a
warm-up. Writes dense_baseline_cpu_<threads>t.md / .csv into --out.

    .venv/bin/python benchmarks/bench_dense_baseline_cpu.py --threads 1
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_linear import SHAPES  # noqa: E402  (the sparse benchmarks' table of real models' shapes)
from machine import DTYPES, RESULTS, cpu_name, doc_parser, write_md_csv  # noqa: E402



def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def median_seconds(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: machine noise hits both alike
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = doc_parser(__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 512], help="M values (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved calls per variant (default 9)")
    ap.add_argument("--out", default=RESULTS, help="folder for dense_baseline_cpu_<threads>t.md/.csv")
    args = ap.parse_args()
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        raise SystemExit("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for dname, dtype in DTYPES.items():
        for shape, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f).to(dtype)
            for m in args.rows:
                x = torch.randn(m, in_f).to(dtype)
                ref = torch.nn.functional.linear(x, w).float()
                got = onednn_linear(x, w).float()
                tol = 1e-3 if dtype == torch.float32 else 3e-2
                if not torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())):
                    raise SystemExit(f"oneDNN and F.linear disagree at {shape} M={m} {dname}")
                t = median_seconds({"F.linear": lambda: torch.nn.functional.linear(x, w),
                                    "oneDNN": lambda: onednn_linear(x, w)}, args.repeats)
                rows.append({"shape": shape, "out_features": out_f, "in_features": in_f, "M": m, "dtype": dname,
                             "F.linear_ms": f"{t['F.linear'] * 1e3:.3f}", "onednn_ms": f"{t['oneDNN'] * 1e3:.3f}",
                             "F.linear_over_onednn": f"{t['F.linear'] / t['oneDNN']:.2f}"})
                print(f"{dname:8s} {shape:22s} M={m:4d}  F.linear {t['F.linear'] * 1e3:9.3f} ms  oneDNN "
                      f"{t['oneDNN'] * 1e3:9.3f} ms  ratio {t['F.linear'] / t['oneDNN']:.2f}", flush=True)
    lines = [
        "# Dense baselines on CPU: F.linear against oneDNN's matmul",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__} (BLAS: {torch.backends.mkl.is_available() and 'MKL' or 'not MKL'}); median of "
        f"{args.repeats} interleaved calls. `ratio` = F.linear time / oneDNN time (above 1: oneDNN is faster).",
        "",
        "| dtype | shape | out x in | M | F.linear ms | oneDNN ms | ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['out_features']}x{r['in_features']} | {r['M']} | "
                     f"{r['F.linear_ms']} | {r['onednn_ms']} | {r['F.linear_over_onednn']} |")
    stem = os.path.join(args.out, f"dense_baseline_cpu_{torch.get_num_threads()}t")
    write_md_csv(stem, "\n".join(lines) + "\n", rows)
    print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
