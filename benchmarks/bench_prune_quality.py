"""Perplexity after pruning, for several methods and sparsity settings, in one process.

Loads the model once, evaluates it dense once, then prunes a fresh copy per setting with the same
calibration windows and evaluates it on the same windows. Writes CSV and a markdown table (with the
machine, versions and date) into --out, so the README's numbers can be regenerated:

    .venv/bin/python benchmarks/bench_prune_quality.py                       # defaults: SmolLM2-135M
    .venv/bin/python benchmarks/bench_prune_quality.py --settings wanda:0.5 magnitude:2:4
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import sys
import time

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from their folder)


def parse_setting(text: str):
    """METHOD:SPARSITY[:owl] or METHOD:N:M -> (method, sparsity, pattern, profile)."""
    parts = text.split(":")
    profile = "uniform"
    if parts[-1] == "owl":
        profile, parts = "owl", parts[:-1]
    if len(parts) == 3:
        return parts[0], None, f"{parts[1]}:{parts[2]}", profile
    return parts[0], float(parts[1]), None, profile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", nargs="+",
                    default=["magnitude:0.5", "wanda:0.5", "magnitude:2:4", "wanda:2:4", "magnitude:4:8", "wanda:4:8"],
                    help="METHOD:SPARSITY[:owl] or METHOD:N:M (default: %(default)s)")
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--eval", default="wikitext2-test")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--name", default="prune_quality_smollm2_cpu")
    args = ap.parse_args(argv)

    import transformers

    import sparsekit
    from sparsekit import data, evaluate
    from sparsekit.models import load_model
    from sparsekit.prune import PruneSpec, parse_pattern, prune_model

    specs = []
    for s in args.settings:
        method, sparsity, pattern, profile = parse_setting(s)
        specs.append(PruneSpec(method, sparsity, parse_pattern(pattern), profile=profile))

    model, tok = load_model(args.model)
    calib = data.calibration_windows(data.tokenize(tok, data.read_text(args.calib)), args.nsamples, args.seqlen,
                                     args.seed)
    windows = data.eval_windows(data.tokenize(tok, data.read_text(args.eval)), args.seqlen, args.eval_tokens)
    t = time.perf_counter()
    dense = evaluate.perplexity(model, windows, progress=True, desc="dense")
    rows = [dict(method="dense", pattern="-", profile="-", sparsity=0.0, ppl=dense, prune_seconds=0.0,
                 eval_seconds=time.perf_counter() - t)]
    print(f"dense ppl {dense:.4f}", file=sys.stderr)
    for spec in specs:
        m = copy.deepcopy(model)
        report = prune_model(m, spec, calib, progress=True)
        t = time.perf_counter()
        ppl = evaluate.perplexity(m, windows, progress=True, desc=f"{spec.method} {spec.pattern_str}")
        rows.append(dict(method=spec.method, pattern=spec.pattern_str, profile=spec.profile,
                         sparsity=report.sparsity, ppl=ppl,
                         prune_seconds=report.seconds, eval_seconds=time.perf_counter() - t))
        print(f"{spec.method} {spec.pattern_str} {spec.profile} s={report.sparsity:.4f} ppl {ppl:.4f}",
              file=sys.stderr)
        del m

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cpu = cpu_name()
    lines = [
        f"# Perplexity after pruning: {args.model}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu}, {torch.get_num_threads()} threads, no GPU",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, sparsekit {sparsekit.__version__}",
        f"- calibration: {args.nsamples} x {args.seqlen} tokens of {args.calib} (seed {args.seed}); "
        f"evaluation: {windows.shape[0]} x {args.seqlen} tokens of {args.eval}; float32",
        "",
        "| method | pattern | profile | sparsity | perplexity | prune s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['profile']} | {r['sparsity']:.4f} | {r['ppl']:.2f} | "
                     f"{r['prune_seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
