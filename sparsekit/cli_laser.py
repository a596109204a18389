"""``sparsekit laser``: search LASER interventions on a validation split, compose, test, save.

``add_parser(subparsers)`` adds the command to the ``sparsekit`` parser; ``run(args)`` runs it (exit code).
``python -m sparsekit.cli_laser ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_parser", "run", "main"]

DEFAULT_SIZES = {"mc": (100, 300), "ppl": (4, 32)}  # (val, test): questions, or windows of --seqlen tokens

EPILOG = """\
examples:
  # the matrix types of a model (paths inside a decoder layer, and the short names of their roles):
  sparsekit laser --model smollm2-135m --list-matrix-types

  # MLP and attention-output matrices of layers 15-29 at three ranks, chosen on 100 ARC-Easy questions,
  # tested on the next 300:
  sparsekit laser --model smollm2-135m --eval-set arc_easy --val 100 --test 300 \\
      --layers 15-29 --matrix-types mlp,attn.o --rhos 0.01,0.1,0.25 --output out/laser-arc

  # perplexity of a text: validation on its first 8 windows of 512 tokens, test on the next 32; or a
  # separate test text with --test-set:
  sparsekit laser --eval-set wikitext2-valid --test-set wikitext2-test --val 8 --test 32 \\
      --layers=-6--1 --matrix-types mlp.down_proj --rhos 0.05,0.1 --output out/laser-wiki

what it does:
  1. loads the model, finds its matrix types, and checks every argument (before any SVD);
  2. computes every SVD once: the targeted matrices of one shape are stacked across layers and factored
     by sparsekit.svd.truncated_svd at the largest rank searched, then reused for every rho;
  3. scores each single intervention (layer, matrix type, rho) on the validation split; rho is the
     fraction of the maximum rank kept: rank = max(1, floor(rho * min(m, n)));
  4. composes greedily: the best single intervention, then the next best (on another matrix) while the
     validation score improves;
  5. evaluates the base model, the best single intervention and the composition on the test split, prints
     a table, and writes OUTPUT atomically: the composed model (sparsekit.save_compressed; reload it with
     sparsekit.load_compressed), its tokenizer, and report.json (every intervention's validation score,
     the composition, test scores, parameter counts, timings, versions).

a reduced matrix becomes a LowRankLinear (factors V and U*S) when that is smaller, i.e. rank < mn/(m+n);
otherwise the rank-reduced matrix is written back dense, as the LASER reference does.

evaluation sets: a text file or built-in text (perplexity, lower is better; --val/--test count windows of
--seqlen tokens), or a multiple-choice set (accuracy, higher is better, ties broken by acc_norm; --val/--test
count questions): arc_easy, arc_challenge, piqa, siqa, openbook_qa, copa, commonsense_qa, boolq, pubmedqa,
winogrande, logiqa, mmlu, mmlu:<subject>, mmlu:medical|legal|economics, or a .jsonl file. Without
--test-set the test split is the slice right after the validation split of the same set.

matrix types: paths inside a decoder layer (mlp.down_proj, attn.c_attn), their short names (attn.q, attn.k,
attn.v, attn.qkv, attn.o, mlp.gate, mlp.up, mlp.down), or groups: attn, mlp, all. LASER's names map as
fc_in = mlp.gate (mlp.up without a gate), fc_up = mlp.up, fc_out = mlp.down, out_proj = attn.o.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .data import BUILTIN_TEXTS
    from .models import BUILTIN_MODELS

    p = subparsers.add_parser(
        "laser", help="LASER: search layer-selective rank reductions on a validation split, compose, test, save",
        description="Layer-selective rank reduction (Sharma et al. 2024): replace chosen weight matrices by "
                    "low-rank approximations, keeping those that improve a validation score.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help=f"local Hugging Face folder, or a built-in name: {', '.join(BUILTIN_MODELS)} "
                        "(default: %(default)s)")
    p.add_argument("--eval-set", metavar="SET",
                   help=f"validation (and test) data: a text file or built-in text ({', '.join(BUILTIN_TEXTS)}) "
                        "for perplexity, or a multiple-choice set (see below) for accuracy")
    p.add_argument("--test-set", metavar="SET", default=None,
                   help="test data of the same kind (default: the slice of --eval-set after the validation split)")
    p.add_argument("--val", type=int, default=None, metavar="N",
                   help="validation size: questions, or windows of --seqlen tokens (default: 100 questions / "
                        "4 windows)")
    p.add_argument("--test", type=int, default=None, metavar="N",
                   help="test size: questions, or windows (default: 300 questions / 32 windows)")
    p.add_argument("--layers", default="last-half",
                   help="decoder layers to search: indices and inclusive ranges (20-29,31; negative from the end: "
                        "-1 is the last; write --layers=-6--1), all, or last-half (default %(default)s)")
    p.add_argument("--matrix-types", default="all",
                   help="comma list of matrix types: paths, short names, or attn, mlp, all (default %(default)s)")
    p.add_argument("--rhos", default="0.01,0.1,0.25",
                   help="fractions of the maximum rank to keep, each in (0, 1] (default %(default)s)")
    p.add_argument("--method", default="randomized", choices=["randomized", "exact"],
                   help="truncated SVD: randomized (HMT range finder) or exact (batched linalg.svd) "
                        "(default %(default)s)")
    p.add_argument("--oversample", type=int, default=10, help="randomized SVD oversampling (default %(default)s)")
    p.add_argument("--power-iters", type=int, default=2,
                   help="randomized SVD power iterations (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window (default %(default)s)")
    p.add_argument("--no-compose", action="store_true", help="score single interventions only; save the best one")
    p.add_argument("--cache-mb", type=int, default=1024,
                   help="memory for recorded activations that let evaluations skip the layers below the "
                        "changed one; 0 disables (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="shared data folder for multiple-choice sets (default: $SPARSEKIT_DATA or ../shared/data)")
    p.add_argument("--list-matrix-types", action="store_true",
                   help="print the model's matrix types (paths, roles, shapes) and exit")
    p.add_argument("--output", metavar="DIR", default=None, help="folder for the model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default %(default)s; the SVDs run in float32)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(command="laser")
    return p


# ----------------------------------------------------------------------------------------------------------

def _check_args(args) -> dict:
    """Everything that can be checked without the model. Returns the loaded data per split source."""
    from . import data, tasks
    from .checkpoint import check_output_dir
    from .laser import parse_layers, parse_rhos
    from .models import resolve_model

    resolve_model(args.model)
    if args.list_matrix_types:
        return {}
    if not args.eval_set:
        raise ValueError("--eval-set is required (a text file, a built-in text, or a multiple-choice set)")
    if not args.output:
        raise ValueError("--output DIR is required (the composed model and report.json go there)")
    parse_rhos(args.rhos)
    parse_layers(args.layers, None)  # syntax only: the range is checked against the model
    if not args.matrix_types.strip():
        raise ValueError("--matrix-types is empty")
    kind = "ppl" if tasks.is_perplexity_text(args.eval_set) else "mc"
    if args.test_set is not None and ("ppl" if tasks.is_perplexity_text(args.test_set) else "mc") != kind:
        raise ValueError(f"--test-set {args.test_set} is not of the same kind as --eval-set {args.eval_set} "
                         "(both texts, or both multiple-choice sets)")
    val, test = DEFAULT_SIZES[kind]
    args.val = val if args.val is None else args.val
    args.test = test if args.test is None else args.test
    for flag, n in (("--val", args.val), ("--test", args.test)):
        if n < 1:
            raise ValueError(f"{flag} must be >= 1 (an empty split cannot be scored), got {n}")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.oversample < 0 or args.power_iters < 0:
        raise ValueError("--oversample and --power-iters must be >= 0")
    if args.cache_mb < 0:
        raise ValueError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    check_output_dir(args.output, args.overwrite, reads=resolve_model(args.model).folder)
    loaded = {"kind": kind}
    if kind == "mc":
        same = args.test_set is None
        need = args.val + args.test if same else args.val
        ex = tasks.load_task(args.eval_set, args.data_dir, limit=need, interleave=True)  # splits span an MMLU domain
        if len(ex) < need:
            what = f"--val {args.val} + --test {args.test} = {need}" if same else f"--val {args.val}"
            raise ValueError(f"{args.eval_set} holds only {len(ex)} questions; {what} needed "
                             "(the test split would be empty or short)")
        loaded["val"] = ex[: args.val]
        if same:
            loaded["test"] = ex[args.val: need]
        else:
            tex = tasks.load_task(args.test_set, args.data_dir, limit=args.test, interleave=True)
            if len(tex) < args.test:
                raise ValueError(f"{args.test_set} holds only {len(tex)} questions; --test {args.test} needed")
            loaded["test"] = tex
    else:
        loaded["val_text"] = data.read_text(args.eval_set)
        loaded["test_text"] = data.read_text(args.test_set) if args.test_set else None
    return loaded


def _text_objectives(args, tokenizer, loaded):
    from . import data
    from .laser import PerplexityObjective

    ids = data.tokenize(tokenizer, loaded["val_text"])
    n = ids.numel() // args.seqlen
    if loaded["test_text"] is None:
        need = args.val + args.test
        if n < need:
            raise data.DataError(f"{args.eval_set} gives {n} windows of {args.seqlen} tokens; --val {args.val} + "
                                 f"--test {args.test} = {need} needed (the test split would be empty or short)")
        w = ids[: need * args.seqlen].reshape(need, args.seqlen)
        return (PerplexityObjective(w[: args.val], args.eval_set),
                PerplexityObjective(w[args.val:], f"{args.eval_set} (after the validation windows)"))
    if n < args.val:
        raise data.DataError(f"{args.eval_set} gives {n} windows of {args.seqlen} tokens; --val {args.val} needed")
    tids = data.tokenize(tokenizer, loaded["test_text"])
    tn = tids.numel() // args.seqlen
    if tn < args.test:
        raise data.DataError(f"{args.test_set} gives {tn} windows of {args.seqlen} tokens; --test {args.test} "
                             "needed")
    return (PerplexityObjective(ids[: args.val * args.seqlen].reshape(args.val, args.seqlen), args.eval_set),
            PerplexityObjective(tids[: args.test * args.seqlen].reshape(args.test, args.seqlen), args.test_set))


def _table(rows: list[tuple], align: str) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(f"{str(c):{'<' if a == 'l' else '>'}{w}}" for c, w, a in zip(r, widths, align))
                     for r in rows)


def _fmt(objective, metrics: dict) -> str:
    return f"{metrics['ppl']:.4f}" if objective.kind == "ppl" else f"{metrics['acc']:.4f}"


def _print_types(model_name: str, types) -> None:
    rows = [("matrix type (path)", "short name", "block", "out x in", "layers")]
    for t in types.values():
        lay = f"{t.layers[0]}-{t.layers[-1]}" if list(t.layers) == list(range(t.layers[0], t.layers[-1] + 1)) \
            else ",".join(map(str, t.layers))
        rows.append((t.name, t.short, t.block, f"{t.shape[0]}x{t.shape[1]}", lay))
    print(f"{model_name}: matrix types of the decoder layers")
    print(_table(rows, "lllrl"))


def _run(args) -> int:
    import torch

    from .cli import _progress, _versions, loader_line
    from .compressed import count_parameters, save_compressed
    from .laser import (Intervention, LaserFactors, MultipleChoiceObjective, PrefixCache, apply_interventions,
                        discover_matrix_types, laser_search, parse_layers, parse_rhos, resolve_matrix_types)
    from .models import find_decoder_layers, load_model

    loaded = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _progress(args)
    t_start = time.perf_counter()
    print(f"loading {args.model} ({args.dtype}, {args.device})", file=sys.stderr)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    if loaded.get("kind") == "ppl":
        from .cli import check_seqlen_fits

        check_seqlen_fits(model, args.seqlen)
    layers = find_decoder_layers(model)
    types = discover_matrix_types(model, layers)
    if args.list_matrix_types:
        _print_types(args.model, types)
        return 0

    # Checks that need the model, all before any SVD.
    layer_ids = parse_layers(args.layers, len(layers))
    names = resolve_matrix_types(args.matrix_types, types)
    rhos = parse_rhos(args.rhos)
    if loaded["kind"] == "mc":
        val_obj = MultipleChoiceObjective(loaded["val"], tokenizer, args.eval_set)
        test_obj = MultipleChoiceObjective(loaded["test"], tokenizer, args.test_set or args.eval_set)
    else:
        val_obj, test_obj = _text_objectives(args, tokenizer, loaded)
    interventions = [Intervention(l, n, r) for l in layer_ids for n in names if l in types[n].layers for r in rhos]
    if not interventions:
        raise ValueError(f"none of the matrix types {', '.join(names)} exists in layers {args.layers}")
    t_loaded = time.perf_counter()
    unit = val_obj.unit
    print(f"searching {len(interventions)} interventions ({len(layer_ids)} layers x {len(names)} matrix types x "
          f"{len(rhos)} rhos) on {len(val_obj)} validation {unit} of {args.eval_set}; test: {len(test_obj)} "
          f"{unit} of {test_obj.source}", file=sys.stderr)

    targets = list(dict.fromkeys((iv.layer, iv.matrix_type) for iv in interventions))
    factors = LaserFactors(model, targets, rhos, method=args.method, oversample=args.oversample,
                           power_iters=args.power_iters, seed=args.seed, progress=progress)
    print(f"SVD: {len(targets)} matrices in {factors.svd_calls} batched calls ({args.method}), "
          f"{factors.seconds:.1f} s", file=sys.stderr)
    cache_bytes = args.cache_mb * 2**20
    search = laser_search(model, val_obj, interventions, factors, compose=not args.no_compose, progress=progress,
                          cache_bytes=cache_bytes)
    best = search.singles[0]
    chosen = search.composed if not args.no_compose else (
        [best.intervention] if val_obj.key(best.metrics) > val_obj.key(search.base) else [])

    # Test split: base (recording the prefix), best single, composition.
    t_test = time.perf_counter()
    start = min(layer_ids) if cache_bytes else 0
    cache = PrefixCache(model, test_obj)
    test_base = cache.capture([start] if start else [], progress=progress, desc="base (test)")
    with apply_interventions(model, [best.intervention], factors):
        test_best = cache.evaluate(start, progress=progress, desc="best single (test)")
    if chosen == [best.intervention]:
        test_composed = test_best
    elif not chosen:
        test_composed = test_base
    else:
        with apply_interventions(model, chosen, factors):
            test_composed = cache.evaluate(start, progress=progress, desc="composed (test)")
    cache.drop()
    t_tested = time.perf_counter()

    params_before = count_parameters(model)
    applied = apply_interventions(model, chosen, factors)
    params_after = count_parameters(model)
    metric = "perplexity" if val_obj.kind == "ppl" else "acc"

    def iv_dict(iv, extra=None):
        d = {"layer": iv.layer, "matrix_type": iv.matrix_type, "short": types[iv.matrix_type].short, "rho": iv.rho}
        return {**d, **(extra or {})}

    report = {
        "model": args.model, "metric": metric, "lower_is_better": val_obj.kind == "ppl",
        "eval_set": args.eval_set, "test_set": args.test_set or args.eval_set,
        "val_size": len(val_obj), "test_size": len(test_obj), "unit": unit,
        "seqlen": args.seqlen if val_obj.kind == "ppl" else None,
        "layers": layer_ids, "rhos": rhos,
        "matrix_types": [{"name": t.name, "short": t.short, "role": t.role, "block": t.block,
                          "shape": list(t.shape)} for t in types.values() if t.name in names],
        "svd": {"method": args.method, "oversample": args.oversample, "power_iters": args.power_iters,
                "seed": args.seed, "matrices": len(targets), "batched_calls": factors.svd_calls,
                "seconds": factors.seconds},
        "val": {"base": search.base, "composed": search.composed_metrics},
        "singles": [iv_dict(r.intervention, {"rank": r.rank, "max_rank": r.max_rank, "storage": r.storage,
                                             "val": r.metrics}) for r in search.singles],
        "best_single": iv_dict(best.intervention, {"rank": best.rank, "val": best.metrics}),
        "composed": [dict(iv_dict(iv), **{k: rec[k] for k in ("rank", "max_rank", "storage")})
                     for iv, rec in zip(chosen, applied.records)],
        "compose_steps": [iv_dict(s.added, {"val": s.metrics, "accepted": s.accepted}) for s in search.steps],
        "test": {"base": test_base, "best_single": test_best, "composed": test_composed},
        "parameters": {"before": params_before, "after": params_after},
        "dtype": args.dtype, "device": args.device,
        "seconds": {"load": t_loaded - t_start, "svd": factors.seconds, "search": search.seconds,
                    "test": t_tested - t_test, "total": time.perf_counter() - t_start},
        "versions": _versions(),
    }
    plain = save_compressed(model, args.output, tokenizer=tokenizer, report=report,
                            overwrite=args.overwrite)["plain_transformers_loadable"]

    base_v = val_obj.headline(search.base)
    rows = [("#", "intervention", "rank", "stored", f"val {metric}", "delta")]
    for i, r in enumerate(search.singles[:10], 1):
        v = val_obj.headline(r.metrics)
        rows.append((i, r.intervention.label(types), f"{r.rank}/{r.max_rank}", r.storage.replace("_", "-"),
                     _fmt(val_obj, r.metrics), f"{v - base_v:+.4f}"))
    print(f"single interventions, best first ({min(10, len(search.singles))} of {len(search.singles)}; "
          f"all in report.json); base val {metric} {_fmt(val_obj, search.base)}")
    print(_table(rows, "rllrrr"))
    print()
    label = " + ".join(iv.label(types) for iv in chosen) or "(none improves validation)"
    print(f"composed: {label}")
    print(_table([
        ("", "base", "best single", "composed"),
        (f"val {metric} ({len(val_obj)} {unit})", _fmt(val_obj, search.base), _fmt(val_obj, best.metrics),
         _fmt(val_obj, search.composed_metrics)),
        (f"test {metric} ({len(test_obj)} {unit})", _fmt(test_obj, test_base), _fmt(test_obj, test_best),
         _fmt(test_obj, test_composed)),
        ("parameters", f"{params_before:,}", "", f"{params_after:,}"),
    ], "lrrr"))
    print(f"total {time.perf_counter() - t_start:.1f} s (SVD {factors.seconds:.1f} s, search {search.seconds:.1f} s); "
          f"saved to {args.output}/ (report.json)")
    print(loader_line(args.output, plain))
    return 0


def run(args) -> int:
    """Run ``sparsekit laser`` with parsed ``args``; bad input prints ``sparsekit: error: ...`` and returns 2."""
    from .checkpoint import OutputExistsError
    from .data import DataError
    from .models import ModelNotFoundError

    try:
        return _run(args)
    except (ValueError, DataError, ModelNotFoundError, OutputExistsError, PermissionError, FileNotFoundError) as e:
        print(f"sparsekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsekit: error: interrupted; nothing was written", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["laser"] + list(sys.argv[1:] if argv is None else argv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
