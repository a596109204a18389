"""Contextual pruning sweep: parameters vs held-out domain perplexity, Mini-GPTs' activation score beside the
structured Wanda-style score (||X_j|| * sum_i |W_ij| per MLP channel), at the same sizes, without fine-tuning.

Statistics are collected once on the dense model; every point prunes a fresh copy. The vocabulary is pruned
the same way for both scores (tokens unseen in the calibration + fine-tune parts), so the two curves differ
only in which MLP channels go. Writes CSV, a markdown table and a plot (matplotlib, if installed).

    python benchmarks/bench_contextual.py --domain medical
    python benchmarks/bench_contextual.py --domain legal --targets 0.9,0.85,0.8

``--pubmedqa-heldout DIR`` instead scores PubMedQA on the questions whose abstracts fall in the held-out part
of the medical file (the medical corpus is built from the same 1000 PubMedQA abstracts, so the others were
seen in calibration / fine-tuning), for the dense model and the saved model in DIR.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402

DOMAINS = {"medical": "domain/medical_pubmedqa_abstracts.txt", "legal": "domain/legal_legalbench_contract_clauses.txt"}
HERE = os.path.dirname(os.path.abspath(__file__))


def domain_path(name: str, data_dir: str | None) -> str:
    from sparsekit.tasks import find_data_dir

    return os.path.join(find_data_dir(data_dir), DOMAINS[name]) if name in DOMAINS else name


def sweep(args) -> None:
    import transformers

    from sparsekit import contextual as C
    from sparsekit import data
    from sparsekit.compressed import count_parameters
    from sparsekit.domain import chunk_perplexity, make_eval_chunks, split_documents
    from sparsekit.models import load_model

    path = domain_path(args.domain, args.data_dir)
    parts = split_documents(data.read_text(path))
    model, tok = load_model(args.model)
    calib_ids = data.tokenize(tok, parts["calib"])
    ft_ids = data.tokenize(tok, parts["finetune"])
    chunks = make_eval_chunks(parts["test"], tok, args.seqlen, args.eval_tokens)
    calib = data.calibration_windows(calib_ids, args.nsamples, args.seqlen, 0)
    t0 = time.perf_counter()
    dense_ppl = chunk_perplexity(model, tok, chunks, True, "dense")
    dense_params = count_parameters(model)
    stats = C.collect_domain_stats(model, calib, token_ids=torch.cat([calib_ids, ft_ids]), progress=True)
    keep = C.vocabulary_keep_set(tok, stats.token_counts)
    rows = [{"score": "dense", "target": 1.0, "params": dense_params, "fraction": 1.0, "ppl": dense_ppl,
             "mlp_channels": None, "vocab": model.config.vocab_size}]
    print(f"dense: {dense_params:,} params, ppl {dense_ppl:.3f}; vocab keep {keep.numel()}", flush=True)
    for score in args.scores.split(","):
        for target in [float(t) for t in args.targets.split(",")]:
            m = copy.deepcopy(model)
            plan = C.plan_removal(m, stats, target_params=target, score=score, scope=args.scope,
                                  vocab_keep=None if args.no_vocab else keep)
            t = C.apply_plan(m, tok, plan)
            ppl = chunk_perplexity(m, t, chunks, True, f"{score} {target}")
            n = count_parameters(m)
            rows.append({"score": score, "target": target, "params": n, "fraction": n / dense_params, "ppl": ppl,
                         "mlp_channels": sum(k.numel() for k in plan.mlp_keep), "vocab": m.config.vocab_size})
            print(f"{score:>10} keep {target:.2f}: {n:,} params ({n / dense_params:.3f}), ppl {ppl:.3f}", flush=True)
            del m
    seconds = time.perf_counter() - t0
    stem = os.path.join(HERE, "results", f"contextual_{args.domain}_cpu")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = (f"# Contextual pruning sweep: {args.domain} (SmolLM2-135M, CPU, no fine-tuning)\n\n"
            f"Measured {datetime.date.today()} on {cpu_name()} ({torch.get_num_threads()} threads), torch "
            f"{torch.__version__}, transformers {transformers.__version__}; {seconds:.0f} s.\n"
            f"Domain file split by documents (calib/finetune/val/test = 0.4/0.4/0.05/0.15); statistics from "
            f"{args.nsamples} x {args.seqlen} calibration tokens; held-out perplexity over "
            f"{chunks.ref_tokens} dense tokens (each model with its own tokenizer, divided by dense tokens). "
            f"Vocabulary: tokens unseen in calibration + fine-tune text removed ({model.config.vocab_size:,} -> "
            f"{keep.numel():,}) {'(not here: --no-vocab)' if args.no_vocab else ''}; then MLP channels "
            f"({args.scope} scope) by score until the parameter target.\n\n"
            "| score | target keep | parameters | fraction | MLP channels | vocab | held-out ppl |\n"
            "|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['score']} | {r['target']:.2f} | {r['params']:,} | {r['fraction']:.3f} | "
                   f"{r['mlp_channels'] if r['mlp_channels'] is not None else '-'} | {r['vocab']:,} | {r['ppl']:.3f} |\n"
                   for r in rows)
    with open(stem + ".md", "w") as f:
        f.write(head + body)
    print(head + body)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for score, label in (("activation", "contextual (mean |act|)"), ("wanda", "Wanda-style ||X||·|W|")):
        pts = sorted((r["params"] / 1e6, r["ppl"]) for r in rows if r["score"] == score)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(dense_ppl, color="gray", ls="--", label=f"dense ({dense_params / 1e6:.1f}M)")
    ax.axhline(dense_ppl * 1.1, color="gray", ls=":", label="dense + 10%")
    ax.set_xlabel("parameters (M, in memory)")
    ax.set_ylabel(f"held-out {args.domain} perplexity")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M, {args.domain}: contextual pruning, no fine-tune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.csv/.md/.png")


def pubmedqa_heldout(args) -> None:
    from sparsekit import data, tasks
    from sparsekit.domain import split_documents
    from sparsekit.models import load_model

    parts = split_documents(data.read_text(domain_path("medical", args.data_dir)))
    questions = [d.split("\n", 1)[0].strip() for d in parts["test"].split("\n\n")]
    examples = tasks.load_task("pubmedqa", args.data_dir)
    held = [ex for ex in examples if any(q and q in ex.contexts[0] for q in questions)]
    print(f"PubMedQA: {len(held)} of {len(examples)} questions have their abstract in the held-out part")
    out = {"n": len(held)}
    for name, model_name in (("dense", args.model), ("pruned", args.pubmedqa_heldout)):
        model, tok = load_model(model_name)
        out[name] = tasks.score_multiple_choice(model, tok, held, progress=True, desc=name)
        print(name, out[name], flush=True)
    with open(os.path.join(args.pubmedqa_heldout, "pubmedqa_heldout.json"), "w") as f:
        json.dump(out, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--domain", default="medical", help="medical, legal, or a text file")
    p.add_argument("--targets", default="0.9,0.85,0.8,0.75,0.7")
    p.add_argument("--scores", default="activation,wanda")
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--no-vocab", action="store_true")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--pubmedqa-heldout", default=None, metavar="DIR")
    args = p.parse_args()
    if args.pubmedqa_heldout:
        pubmedqa_heldout(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
