"""LASER search on SmolLM2-135M (CPU): every single intervention's validation effect, the greedy composition on
a held-out test split, parameter counts, and where the time goes (SVD vs evaluations).

Runs ``sparsekit laser`` (the same code path as the command) and turns its report.json into
``benchmarks/results/laser_smollm2_cpu.{md,csv,json}``. Defaults: layers 15-29, matrix types mlp.down,
mlp.up, mlp.gate and attn.o, rho in {0.01, 0.1, 0.25}; validation: perplexity on the first 4 windows of 512
tokens of the built-in WikiText-2 valid slice; test: the first 32 windows (16384 tokens) of WikiText-2 test.

    .venv/bin/python benchmarks/bench_laser.py [--output runs/laser-bench] [--report runs/laser-bench/report.json]

With ``--report`` an existing report is formatted without running anything.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys

from machine import cpu_name  # benchmarks/machine.py (scripts run from their folder)

DEFAULT_ARGS = ["--model", "smollm2-135m", "--eval-set", "wikitext2-valid", "--test-set", "wikitext2-test",
                "--val", "4", "--test", "32", "--seqlen", "512", "--layers", "15-29",
                "--matrix-types", "mlp.down,mlp.up,mlp.gate,attn.o", "--rhos", "0.01,0.1,0.25",
                "--method", "randomized"]


def _metric(report: dict, m: dict) -> float:
    return m["ppl"] if report["metric"] == "perplexity" else m["acc"]


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def command_of(report: dict) -> list[str]:
    """The ``sparsekit laser`` arguments that produce ``report`` (read back from it)."""
    cmd = ["--model", report["model"], "--eval-set", report["eval_set"]]
    if report["test_set"] != report["eval_set"]:
        cmd += ["--test-set", report["test_set"]]
    cmd += ["--val", str(report["val_size"]), "--test", str(report["test_size"])]
    if report.get("seqlen"):
        cmd += ["--seqlen", str(report["seqlen"])]
    cmd += ["--layers", _ranges(report["layers"]),
            "--matrix-types", ",".join(t["short"] for t in report["matrix_types"]),
            "--rhos", ",".join(f"{r:g}" for r in report["rhos"]), "--method", report["svd"]["method"],
            "--output", "DIR"]
    return cmd


def write_results(report: dict, out_dir: str, name: str) -> str:
    command = command_of(report)
    os.makedirs(out_dir, exist_ok=True)
    metric = report["metric"]
    base = _metric(report, report["val"]["base"])
    rows = []
    for s in sorted(report["singles"], key=lambda s: (s["layer"], s["short"], s["rho"])):
        v = _metric(report, s["val"])
        rows.append({"layer": s["layer"], "matrix_type": s["short"], "path": s["matrix_type"], "rho": s["rho"],
                     "rank": s["rank"], "max_rank": s["max_rank"], "stored": s["storage"],
                     f"val_{metric}": round(v, 4), "delta": round(v - base, 4)})
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    v, t = report["versions"], report["test"]
    ranked = report["singles"]
    lower = report["lower_is_better"]
    better = [s for s in ranked if (_metric(report, s["val"]) < base if lower else _metric(report, s["val"]) > base)]
    sec = report["seconds"]
    lines = [
        "# LASER on SmolLM2-135M (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, {v['cpu_threads']} threads, no GPU "
        "(2 cores shared with other jobs: timings are indicative)",
        f"- python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, sparsekit {v['sparsekit']}",
        f"- command: `sparsekit laser {' '.join(command)}` (or `benchmarks/bench_laser.py`)",
        f"- validation: {metric} on {report['val_size']} {report['unit']} of {report['eval_set']}"
        + (f" x {report['seqlen']} tokens" if report.get("seqlen") else "")
        + f"; test: {report['test_size']} {report['unit']} of {report['test_set']} (disjoint text)",
        f"- SVD: {report['svd']['method']} (oversample {report['svd']['oversample']}, power iterations "
        f"{report['svd']['power_iters']}), {report['svd']['matrices']} matrices in {report['svd']['batched_calls']} "
        f"batched calls at the largest rank searched, reused for every rho",
        f"- rank = max(1, floor(rho * min(m, n))); stored as LowRankLinear when rank < mn/(m+n), else written "
        "back dense",
        "",
        "## Held-out test split",
        "",
        f"| model | val {metric} | test {metric} | parameters |",
        "|---|---:|---:|---:|",
        f"| base | {base:.4f} | {_metric(report, t['base']):.4f} | {report['parameters']['before']:,} |",
        f"| best single: L{report['best_single']['layer']} {report['best_single']['short']} "
        f"rho={report['best_single']['rho']:g} | {_metric(report, report['best_single']['val']):.4f} | "
        f"{_metric(report, t['best_single']):.4f} | |",
        f"| composed ({len(report['composed'])}) | {_metric(report, report['val']['composed']):.4f} | "
        f"{_metric(report, t['composed']):.4f} | {report['parameters']['after']:,} |",
        "",
        "Composed: " + (", ".join(f"L{c['layer']} {c['short']} rho={c['rho']:g} (rank {c['rank']}/{c['max_rank']}, "
                                  f"{c['storage'].replace('_', '-')})" for c in report["composed"])
                        or "none (no single intervention improved validation)"),
        "",
        "Greedy steps: " + "; ".join(f"+L{s['layer']} {s['short']} rho={s['rho']:g} -> "
                                     f"{_metric(report, s['val']):.4f} ({'kept' if s['accepted'] else 'stop'})"
                                     for s in report["compose_steps"]),
        "",
        f"Single interventions that improved validation: {len(better)} of {len(ranked)}.",
        "",
        f"Time: load {sec['load']:.0f} s, SVD {sec['svd']:.1f} s, search {sec['search']:.0f} s "
        f"({len(ranked)} interventions + composition), test {sec['test']:.0f} s; total {sec['total']:.0f} s.",
        "",
        f"Against the base model, the composition changed validation {metric} by "
        f"{_metric(report, report['val']['composed']) - base:+.4f} and test {metric} by "
        f"{_metric(report, t['composed']) - _metric(report, t['base']):+.4f}; the best single intervention "
        f"changed test {metric} by {_metric(report, t['best_single']) - _metric(report, t['base']):+.4f}.",
        "",
        "## Would a custom SVD kernel pay?",
        "",
        f"Not here: all {report['svd']['matrices']} SVDs of the search took {sec['svd']:.1f} s, "
        f"{100 * sec['svd'] / max(sec['total'], 1e-9):.1f}% of the run; the rest is evaluating the model "
        f"({len(ranked)} validation passes and the test passes). A kernel that made the SVDs free would shorten "
        "the search by that fraction at most. The batched randomized SVD is already GEMMs and QR in MKL "
        "(svd_cpu.md: 5.5-7.4x faster than looping torch.linalg.svd on SmolLM2's stacks, within 1.02x of "
        "the Eckart-Young optimum).",
        "",
        f"## Every single intervention (validation {metric}; delta against base {base:.4f})",
        "",
    ]
    rhos = sorted({s["rho"] for s in ranked})
    types = list(dict.fromkeys(s["short"] for s in sorted(ranked, key=lambda s: s["matrix_type"])))
    lines += ["| layer | " + " | ".join(f"{ty} rho={r:g}" for ty in types for r in rhos) + " |",
              "|---:|" + "---:|" * (len(types) * len(rhos))]
    cell = {(s["layer"], s["short"], s["rho"]): _metric(report, s["val"]) - base for s in ranked}
    for layer in sorted({s["layer"] for s in ranked}):
        vals = [cell.get((layer, ty, r)) for ty in types for r in rhos]
        lines.append(f"| {layer} | " + " | ".join("" if x is None else f"{x:+.3f}" for x in vals) + " |")
    lines += ["", "Ranks per rho: " + "; ".join(
        f"{ty}: " + ", ".join(f"{r:g} -> {next(s['rank'] for s in ranked if s['short'] == ty and s['rho'] == r)}"
                               for r in rhos) for ty in types), ""]
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="runs/laser-bench", help="folder for the composed model and report.json")
    ap.add_argument("--report", default=None, help="format this report.json instead of running the search")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--name", default="laser_smollm2_cpu")
    args, extra = ap.parse_known_args(argv)
    if args.report is None:
        from sparsekit.cli_laser import main as laser_main

        code = laser_main(DEFAULT_ARGS + extra + ["--output", args.output, "--overwrite"])
        if code:
            return code
        args.report = os.path.join(args.output, "report.json")
    with open(args.report) as f:
        report = json.load(f)
    print(write_results(report, args.results, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
