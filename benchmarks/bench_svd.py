"""Batched randomized truncated SVD against looping torch.linalg.svd, with the Eckart-Young error ratio.

Cases (named, as in the LASER issue): a stack of 16 random 1024x2752 matrices at rank 64, and stacks of
real SmolLM2-135M weights of one shape (all 30 layers' mlp.gate_proj 1536x576 and mlp.down_proj 576x1536)
at rank 64. Both sides are timed in this process (median of --repeats runs after one warm-up); the error
ratio is ||W - W_r||_F / ||W - W_opt||_F, worst over the stack.

    .venv/bin/python benchmarks/bench_svd.py [--repeats 3] [--out benchmarks/results]
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
from machine import cpu_name  # benchmarks/machine.py (scripts run from their folder)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cases(include_model: bool):
    g = torch.Generator().manual_seed(0)
    yield "random 16x(1024x2752)", torch.randn(16, 1024, 2752, generator=g), 64
    if include_model:
        from sparsekit.models import find_decoder_layers, load_model

        model, _ = load_model("smollm2-135m")
        layers = find_decoder_layers(model)
        yield "smollm2 30x mlp.gate (1536x576)", torch.stack([l.mlp.gate_proj.weight.detach() for l in layers]), 64
        yield "smollm2 30x mlp.down (576x1536)", torch.stack([l.mlp.down_proj.weight.detach() for l in layers]), 64


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--no-model", action="store_true", help="skip the SmolLM2 cases")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)

    from sparsekit.svd import truncated_svd, truncation_report

    rows = []
    for name, w, rank in _cases(not args.no_model):
        loop = lambda: [torch.linalg.svd(m, full_matrices=False) for m in w]  # noqa: E731
        t_loop = _median_time(loop, args.repeats)
        g = torch.Generator().manual_seed(1)
        rnd = lambda: truncated_svd(w, rank, "randomized", args.oversample, args.power_iters, g)  # noqa: E731
        t_rnd = _median_time(rnd, args.repeats)
        t_exact = _median_time(lambda: truncated_svd(w, rank, "exact"), 1)
        rep = truncation_report(w, *rnd(), rank)
        rows.append(dict(case=name, rank=rank, loop_svd_s=t_loop, batched_exact_s=t_exact, randomized_s=t_rnd,
                         speedup=t_loop / t_rnd, worst_error_ratio=rep.worst_ratio,
                         mean_error=sum(rep.error) / len(rep.error), mean_optimum=sum(rep.optimum) / len(rep.optimum)))
        print(rows[-1], file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "svd_cpu.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    cpu = cpu_name()
    lines = [
        "# Truncated SVD on CPU: batched randomized vs looping torch.linalg.svd",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu}, {torch.get_num_threads()} threads, no GPU",
        f"- torch {torch.__version__}; randomized: oversample {args.oversample}, power iterations "
        f"{args.power_iters}; medians of {args.repeats} runs after a warm-up",
        "",
        "| case | rank | loop linalg.svd s | batched exact s | randomized s | speedup vs loop | worst error / optimum |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['rank']} | {r['loop_svd_s']:.3f} | {r['batched_exact_s']:.3f} | "
                     f"{r['randomized_s']:.3f} | {r['speedup']:.1f}x | {r['worst_error_ratio']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "svd_cpu.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
