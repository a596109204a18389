"""``sparsekit contextual``: shrink a model for a domain (Mini-GPTs contextual pruning), recover, evaluate."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  # keep 84% of SmolLM2-135M's parameters for medical text, 40 recovery steps, MMLU medical accuracy:
  sparsekit contextual --model smollm2-135m --domain ../shared/data/domain/medical_pubmedqa_abstracts.txt \\
      --target-params 0.84 --nsamples 16 --eval-tokens 8192 --finetune-steps 40 \\
      --tasks mmlu:medical --limit 60 --output out/medical84

  # Mini-GPTs' threshold instead of a size target (channels with mean |activation| below 0.05 go):
  sparsekit contextual --domain legal.txt --threshold 0.05 --output out/legal

  # the structured Wanda-style baseline at the same size (channels ranked by ||X_j|| * sum_i |W_ij|):
  sparsekit contextual --domain legal.txt --target-params 0.85 --score wanda --output out/legal-wanda

what it does:
  1. splits --domain into calibration / fine-tune / validation / held-out test parts (whole documents, in
     file order; --splits), and measures the dense model's held-out perplexity;
  2. one streaming pass over --nsamples calibration windows collects the mean |activation| (and ||X||) of
     every MLP channel and attention head, and the token frequencies of the calibration + fine-tune text;
  3. removes, physically: embedding/LM-head rows of tokens the domain never uses (the tokenizer is rebuilt
     to match; --no-vocab keeps the vocabulary), --heads of the query heads, and then as many MLP
     channels as --target-params asks (same number per layer with --scope layer; ranked across layers with
     --scope global), or those below --threshold;
  4. fine-tunes the remaining weights for --finetune-steps on the fine-tune part (early stopping on the
     validation part), evaluates again, and writes OUTPUT atomically: the model (sparsekit.load_compressed
     loads it; AutoModelForCausalLM.from_pretrained too where every layer keeps the same width and head count
     and the architecture's config can state them, which the last line printed says), its tokenizer, and
     report.json (dense_params, pruned_params, dense_ppl, pruned_ppl, ...).

perplexity: exp(total NLL / number of dense-tokenizer tokens) over chunks of --seqlen dense tokens of the
held-out part, each model using its own tokenizer; so a pruned vocabulary is compared fairly.
parameters: counted in memory, embeddings included, tied tensors once.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from .models import BUILTIN_MODELS

    p = sub.add_parser(
        "contextual", help="shrink a model for a domain: remove unused MLP channels, heads and vocabulary",
        description="Contextual pruning (Mini-GPTs, Valicenti et al. 2023) with physical removal: the model gets "
                    "smaller in memory and on disk, then a short fine-tune recovers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help=f"local Hugging Face folder or built-in name ({', '.join(BUILTIN_MODELS)}); default %(default)s")
    p.add_argument("--domain", required=True, metavar="FILE", help="domain text file (documents separated by blank lines)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-params", type=float, metavar="F",
                      help="fraction of the dense parameter count to keep, in (0, 1], e.g. 0.85")
    size.add_argument("--threshold", type=float, metavar="TAU",
                      help="remove MLP channels whose mean |activation| on the domain is below TAU")
    p.add_argument("--heads", type=float, default=0.0,
                   help="fraction of query heads to remove in every layer (with grouped-query attention the same "
                        "number from every key/value group); default %(default)s")
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="layer: the same number of MLP channels removed from every layer (plain transformers can "
                        "load the result, unless --heads leaves a head count the architecture's config cannot "
                        "state: the last line printed says); global: channels ranked across layers (default "
                        "%(default)s)")
    p.add_argument("--score", choices=["activation", "wanda"], default="activation",
                   help="activation: mean |activation| (Mini-GPTs); wanda: ||X_j|| * sum_i |W_ij| of the channel "
                        "(structured Wanda-style baseline); default %(default)s")
    p.add_argument("--no-vocab", action="store_true", help="keep the whole vocabulary")
    p.add_argument("--vocab-min-count", type=int, default=1,
                   help="keep tokens seen at least this often in the calibration + fine-tune text (default %(default)s)")
    p.add_argument("--keep-text", default=None, metavar="TEXT_OR_FILE",
                   help="text (or a file of it) whose tokens are always kept, e.g. the answer words of a task: "
                        "--keep-text ' yes no maybe'; without it, words absent from the domain text are spelled "
                        "in smaller pieces by the rebuilt tokenizer")
    p.add_argument("--splits", default="0.4,0.4,0.05,0.15", metavar="C,F,V,T",
                   help="calibration, fine-tune, validation, held-out test shares of the domain file "
                        "(default %(default)s)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration/evaluation window (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="held-out tokens evaluated (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tuning steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=5e-5, help="fine-tune learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="fine-tune windows per step (default %(default)s)")
    p.add_argument("--finetune-seqlen", type=int, default=256, help="fine-tune window length (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="validate every N fine-tune steps; the best state is kept (default %(default)s)")
    p.add_argument("--tasks", default=None,
                   help="multiple-choice sets to score before and after, e.g. mmlu:medical,pubmedqa (see "
                        "`sparsekit eval --help`)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each multiple-choice set (of each subject for MMLU)")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $SPARSEKIT_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration windows and fine-tuning (default %(default)s)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_splits(text: str) -> tuple[float, ...]:
    from .data import DataError

    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--splits must be 4 comma-separated fractions, got '{text}'") from None
    return vals


def run(args) -> int:
    import torch

    from . import contextual as ctx
    from . import data, tasks
    from .checkpoint import check_output_dir
    from .cli import _progress, _table, _versions, loader_line
    from .compressed import count_parameters, save_compressed
    from .domain import chunk_perplexity, make_eval_chunks, split_documents
    from .finetune import FinetuneConfig, finetune_
    from .cli import check_seqlen_fits
    from .models import load_model, resolve_model

    # --- validate everything cheap before the long work
    if args.target_params is not None and not (0 < args.target_params <= 1):
        raise ValueError(f"--target-params is the fraction of parameters to keep, in (0, 1]; got {args.target_params}")
    if args.threshold is not None and args.score == "wanda":
        raise ValueError("--threshold applies to mean |activation|; use --target-params with --score wanda")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise ValueError(f"--threshold is a mean |activation|, a finite number >= 0; got {args.threshold}")
    if not (0 <= args.heads < 1):
        raise ValueError(f"--heads is a fraction in [0, 1), got {args.heads}")
    if args.vocab_min_count < 1:
        raise ValueError(f"--vocab-min-count must be >= 1, got {args.vocab_min_count}")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2 (a window predicts its tokens after the first), got {args.seqlen}")
    if args.nsamples < 1:
        raise ValueError(f"--nsamples must be >= 1, got {args.nsamples}")
    if args.eval_tokens < args.seqlen:
        raise ValueError(f"--eval-tokens {args.eval_tokens} is less than one window of --seqlen {args.seqlen}")
    ft_cfg = FinetuneConfig(args.finetune_steps, lr=args.lr, batch_size=args.batch_size, seqlen=args.finetune_seqlen,
                            eval_every=args.eval_every, seed=args.seed)
    check_output_dir(args.output, args.overwrite, reads=resolve_model(args.model).folder)
    parts = split_documents(data.read_text(args.domain), _parse_splits(args.splits))
    task_sets = {}
    if args.tasks:
        for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            task_sets[name] = tasks.load_task(name, args.data_dir, args.limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _progress(args)

    t0 = time.perf_counter()
    print(f"loading {args.model}", file=sys.stderr)
    model, tokenizer = load_model(args.model, "float32", args.device)
    ctx.check_plain_layers(model)
    check_seqlen_fits(model, args.seqlen)
    if args.finetune_steps:
        check_seqlen_fits(model, args.finetune_seqlen, "--finetune-seqlen")
    calib_ids = data.tokenize(tokenizer, parts["calib"])
    if calib_ids.numel() < args.seqlen + 1:
        raise data.DataError(f"the calibration part of {args.domain} has {calib_ids.numel()} tokens, fewer than "
                             f"--seqlen+1 = {args.seqlen + 1}: the domain file is too short to calibrate (give more "
                             "text, a smaller --seqlen, or a larger calibration share in --splits)")
    ft_ids = data.tokenize(tokenizer, parts["finetune"]) if parts["finetune"] else calib_ids[:0]
    test_chunks = make_eval_chunks(parts["test"], tokenizer, args.seqlen, args.eval_tokens, "held-out part")
    val_chunks = (make_eval_chunks(parts["val"], tokenizer, min(args.seqlen, 256), 4096, "validation part")
                  if args.finetune_steps else None)
    if args.finetune_steps and ft_ids.numel() < args.finetune_seqlen + 1:
        raise data.DataError(f"the fine-tune part has {ft_ids.numel()} tokens, fewer than --finetune-seqlen+1")
    calib = data.calibration_windows(calib_ids, args.nsamples, args.seqlen, args.seed, source="calibration part")

    dense_params = count_parameters(model)
    dense_ppl = chunk_perplexity(model, tokenizer, test_chunks, progress, "dense ppl")
    dense_tasks = {n: tasks.score_multiple_choice(model, tokenizer, ex, progress=progress, desc=f"dense {n}")
                   for n, ex in task_sets.items()}
    t_dense = time.perf_counter()

    stats = ctx.collect_domain_stats(model, calib, token_ids=torch.cat([calib_ids, ft_ids]), progress=progress)
    extra_ids = None
    if args.keep_text:
        import os

        keep_text = data.read_text(args.keep_text) if os.path.isfile(args.keep_text) else args.keep_text
        extra_ids = data.tokenize(tokenizer, keep_text).tolist()
    vocab_keep = None if args.no_vocab else ctx.vocabulary_keep_set(tokenizer, stats.token_counts,
                                                                    args.vocab_min_count, extra_ids=extra_ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ctx.ContextualWarning)
        plan = ctx.plan_removal(model, stats, target_params=args.target_params, threshold=args.threshold,
                                heads=args.heads, scope=args.scope, score=args.score, vocab_keep=vocab_keep)
    for w in caught:
        if issubclass(w.category, ctx.ContextualWarning):
            print(f"sparsekit: note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    layers = ctx.find_decoder_layers(model)
    hidden = model.config.hidden_size
    widths = [ctx.find_mlp(layer, hidden).width for layer in layers]
    head_counts = []
    for layer in layers:
        try:
            head_counts.append(ctx.find_attention(layer, hidden).num_heads)
        except ctx.ContextualError:
            head_counts.append(None)
    vocab_before = model.get_input_embeddings().num_embeddings
    summary = plan.summary(widths, head_counts, vocab_before)
    tokenizer = ctx.apply_plan(model, tokenizer, plan)
    pruned_params = count_parameters(model)
    t_pruned = time.perf_counter()
    ppl_before_ft = chunk_perplexity(model, tokenizer, test_chunks, progress, "pruned ppl")

    ft = None
    if args.finetune_steps:
        ft_tokens = data.tokenize(tokenizer, parts["finetune"])  # the pruned tokenizer: same ids as the domain's
        ft = finetune_(model, tokenizer, ft_tokens, val_chunks, ft_cfg, progress=progress)
    pruned_ppl = chunk_perplexity(model, tokenizer, test_chunks, progress, "pruned ppl") if ft else ppl_before_ft
    pruned_tasks = {n: tasks.score_multiple_choice(model, tokenizer, ex, progress=progress, desc=f"pruned {n}")
                    for n, ex in task_sets.items()}
    t_end = time.perf_counter()

    report = {
        "model": args.model, "domain": args.domain,
        "dense_params": dense_params, "pruned_params": pruned_params,
        "params_fraction": pruned_params / dense_params,
        "dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "pruned_ppl_before_finetune": ppl_before_ft,
        "ppl_definition": "exp(total NLL / dense-tokenizer tokens predicted) over chunks of seqlen dense tokens "
                          "of the held-out part, each model with its own tokenizer",
        "target_params": args.target_params, "threshold": args.threshold, "heads": args.heads,
        "scope": args.scope, "score": args.score, "vocab_pruned": not args.no_vocab,
        "removed": summary,
        "splits": {k: {"chars": len(v)} for k, v in parts.items()},
        "calib_tokens": int(calib.numel()), "eval_tokens": test_chunks.ref_tokens, "seqlen": args.seqlen,
        "tasks": {n: {"dense": dense_tasks[n], "pruned": pruned_tasks[n]} for n in task_sets},
        "finetune": None if ft is None else {
            "steps_requested": args.finetune_steps, "steps_run": ft.steps_run, "best_step": ft.best_step,
            "lr": args.lr, "batch_size": args.batch_size, "seqlen": args.finetune_seqlen,
            "start_val_nll": ft.start_val_nll, "best_val_nll": ft.best_val_nll, "history": ft.history,
            "seconds": ft.seconds},
        "seconds": {"dense_eval": t_dense - t0, "prune": t_pruned - t_dense, "total": t_end - t0},
        "versions": _versions(),
    }
    extra = {"vocab_map": plan.vocab_keep.tolist()} if plan.vocab_keep is not None else None
    manifest = save_compressed(model, args.output, tokenizer=tokenizer, report=report, overwrite=args.overwrite,
                               extra=extra)

    rows = [("", "dense", "pruned"),
            ("parameters", f"{dense_params:,}", f"{pruned_params:,} ({pruned_params / dense_params:.1%})"),
            ("MLP channels", f"{summary['mlp_channels']['before']:,}", f"{summary['mlp_channels']['after']:,}"),
            ("attention heads", f"{summary['heads']['before']}", f"{summary['heads']['after']}"),
            ("vocabulary", f"{summary['vocab']['before']:,}", f"{summary['vocab']['after']:,}"),
            ("held-out perplexity", f"{dense_ppl:.3f}",
             f"{pruned_ppl:.3f}" + (f" (before fine-tune {ppl_before_ft:.3f})" if ft else ""))]
    for n in task_sets:
        rows.append((f"{n} acc / acc_norm", f"{dense_tasks[n]['acc']:.4f} / {dense_tasks[n]['acc_norm']:.4f}",
                     f"{pruned_tasks[n]['acc']:.4f} / {pruned_tasks[n]['acc_norm']:.4f}"))
    print(_table(rows))
    print(f"held-out: {len(test_chunks.texts)} chunks x {args.seqlen} dense tokens; total {t_end - t0:.1f} s; "
          f"saved to {args.output}/ (report.json)")
    print(loader_line(args.output, manifest["plain_transformers_loadable"]))
    return 0
