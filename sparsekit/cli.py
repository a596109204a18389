"""The ``sparsekit`` command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

__all__ = ["main", "build_parser", "run_prune"]

PRUNE_EPILOG = """\
examples:
  # Wanda, 50% unstructured, on the built-in SmolLM2-135M, calibrated on built-in WikiText-2 valid text,
  # perplexity on the first 16384 tokens of WikiText-2 test:
  sparsekit prune --model smollm2-135m --method wanda --sparsity 0.5 --output out/wanda50

  # 2:4 semi-structured (2 zeros in every 4 consecutive input weights), your own domain text:
  sparsekit prune --model ./my-hf-model --method wanda --pattern 2:4 \\
      --calib medical.txt --eval medical_heldout.txt --output out/wanda24

  # quick smoke run (small calibration and evaluation budget):
  sparsekit prune --method wanda --sparsity 0.5 --nsamples 4 --seqlen 128 --eval-tokens 2048 --output /tmp/x

  # a model larger than memory: one decoder layer at a time from disk (safetensors), written back pruned:
  sparsekit prune --model ./big-hf-model --method sparsegpt --sparsity 0.5 --offload --output out/big-sg50

  # pack the pruned linears (2:4 -> values + 2-bit indices) for faster decode with SparseLinear:
  sparsekit prune --method wanda --pattern 2:4 --save-compressed --output out/wanda24c
  sparsekit bench --model out/wanda24c

  # distributed calibration: the ranks split the windows and all-reduce their statistics (gloo on CPU,
  # NCCL on GPU); the masks equal the single-process run up to float rounding; rank 0 writes OUTPUT
  # (torchrun --no-python finds sparsekit on PATH: activate the environment, or PATH=.venv/bin:$PATH):
  torchrun --nproc-per-node 2 --no-python sparsekit prune --method sparsegpt --sparsity 0.5 --output out/sg50

what it does:
  1. loads the model (float32 on CPU by default) and evaluates its perplexity;
  2. draws --nsamples random windows of --seqlen tokens from the calibration text (--seed);
  3. prunes the linear layers of each decoder block in turn (embeddings and LM head are never pruned),
     collecting input statistics on the outputs of the already-pruned blocks (Wanda's sequential scheme);
  4. evaluates the pruned model, prints a table, and writes OUTPUT atomically: the pruned model
     (safetensors, loadable with transformers' AutoModelForCausalLM.from_pretrained; with --save-compressed,
     or for a --model folder written by `sparsekit contextual` or `sparsekit laser` whose layers the config
     does not describe, only with sparsekit.load_compressed: the last line printed says which), its
     tokenizer, and report.json (dense_ppl, pruned_ppl, sparsity, prune_seconds, method, pattern, ...).

perplexity: exp(mean NLL over every predicted token) on non-overlapping --seqlen windows over the
first --eval-tokens tokens of the evaluation text.
"""


def build_parser() -> argparse.ArgumentParser:
    from .data import BUILTIN_TEXTS
    from .models import BUILTIN_MODELS
    from .prune import METHODS

    p = argparse.ArgumentParser(prog="sparsekit", description="Prune causal LMs and measure the result.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pr = sub.add_parser(
        "prune", help="prune a model's linear layers (magnitude, Wanda, SparseGPT), evaluate, save",
        description="Prune every linear layer of a causal LM's decoder blocks, evaluate perplexity before and "
                    "after, and save the pruned model.",
        epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--model", default="smollm2-135m",
                    help=f"local Hugging Face folder, or a built-in name: {', '.join(BUILTIN_MODELS)} "
                         "(default: %(default)s)")
    pr.add_argument("--method", required=True, choices=sorted(METHODS),
                    help="; ".join(f"{k}: {v.doc}" for k, v in METHODS.items()))
    pr.add_argument("--sparsity", type=float, default=None,
                    help="fraction of weights to prune in each linear layer, in [0, 1) (with --pattern N:M "
                         "it is N/M and may be omitted)")
    pr.add_argument("--pattern", default=None, metavar="N:M",
                    help="semi-structured pattern: N zeros in every M consecutive input weights, e.g. 2:4, 4:8")
    pr.add_argument("--calib", default="wikitext2-valid", metavar="FILE",
                    help=f"calibration text file, or a built-in ({', '.join(BUILTIN_TEXTS)}); default %(default)s")
    pr.add_argument("--nsamples", type=int, default=32, help="calibration windows (default %(default)s)")
    pr.add_argument("--seqlen", type=int, default=512,
                    help="tokens per calibration and evaluation window (default %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default %(default)s)")
    pr.add_argument("--eval", default="wikitext2-test", metavar="FILE",
                    help="evaluation text file or built-in (default %(default)s: the first 96 KiB of WikiText-2 test)")
    pr.add_argument("--eval-tokens", type=int, default=16384,
                    help="evaluate on the first N tokens of the evaluation text (default %(default)s)")
    pr.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per update block (default %(default)s)")
    pr.add_argument("--percdamp", type=float, default=0.01,
                    help="sparsegpt: Hessian damping as a fraction of its mean diagonal (default %(default)s)")
    pr.add_argument("--sparsity-profile", default="uniform", choices=["uniform", "owl"],
                    help="uniform: every block at --sparsity; owl: per-block sparsities from the blocks' outlier "
                         "ratios (Yin et al. 2023), mean --sparsity (unstructured only; default %(default)s)")
    pr.add_argument("--owl-m", type=float, default=5.0,
                    help="owl: a score is an outlier above M times its block's mean (default %(default)s)")
    pr.add_argument("--owl-lambda", type=float, default=0.08,
                    help="owl: block sparsities span 2*lambda, with mean --sparsity (default %(default)s)")
    pr.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned model and report.json")
    pr.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype to load and prune the model in (default %(default)s)")
    pr.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s)")
    pr.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    pr.add_argument("--offload", action="store_true",
                    help="bounded memory: read one decoder layer at a time from the model folder's safetensors, "
                         "prune it, write it to OUTPUT and drop it (peak memory ~ one layer + the calibration "
                         "activations; perplexity is computed layer by layer too). Needs a local safetensors "
                         "folder; OUTPUT is a sharded checkpoint")
    pr.add_argument("--activations-on-cpu", action="store_true",
                    help="with --offload and a GPU --device: keep the calibration activations in host memory "
                         "while each layer runs on the GPU")
    pr.add_argument("--save-compressed", action="store_true",
                    help="save OUTPUT with sparsekit.save_compressed: pruned linears become SparseLinear layers "
                         "in packed formats (per layer 2:4 where the layer fits it, else bitmap: other N:M "
                         "patterns are stored as bitmaps, which are no larger); reload with "
                         "sparsekit.load_compressed (from_pretrained cannot, unless no layer was packed: the last "
                         "line printed says which), or run `sparsekit bench --model OUTPUT`")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = sub.add_parser(
        "eval", help="perplexity and multiple-choice accuracy of a model",
        description="Evaluate a model: perplexity on text files and accuracy on multiple-choice sets.",
        epilog="examples:\n"
               "  sparsekit eval --model runs/demo --tasks wikitext2-test,arc_easy,piqa --limit 300\n"
               "  sparsekit eval --model smollm2-135m --tasks mmlu:medical,pubmedqa --output medical.json\n\n"
               "tasks: a text file or built-in text (perplexity), or a multiple-choice set: "
               "arc_easy, arc_challenge, piqa, siqa, openbook_qa, copa, commonsense_qa, boolq, pubmedqa, "
               "winogrande, logiqa, mmlu, mmlu:<subject>, mmlu:medical|legal|economics, or a .jsonl file.\n"
               "accuracy: argmax of the summed log-probability of ' ' + choice given the query (acc), and of "
               "that sum per UTF-8 byte of ' ' + choice (acc_norm; lm-eval-harness divides by the choice's characters).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default="smollm2-135m", help="local HF folder or built-in name (default %(default)s)")
    ev.add_argument("--tasks", required=True, help="comma-separated tasks (see below)")
    ev.add_argument("--limit", type=int, default=None, help="first N questions of each multiple-choice set (of each subject for MMLU)")
    ev.add_argument("--seqlen", type=int, default=512, help="perplexity window (default %(default)s)")
    ev.add_argument("--eval-tokens", type=int, default=16384, help="perplexity tokens (default %(default)s)")
    ev.add_argument("--data-dir", default=None, help="shared data folder (default: $SPARSEKIT_DATA or ../shared/data)")
    ev.add_argument("--output", default=None, metavar="FILE", help="write the results as JSON")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-progress", action="store_true")

    from . import cli_bench, cli_contextual, cli_laser

    cli_contextual.add_parser(sub)
    cli_laser.add_parser(sub)
    cli_bench.add_parser(sub)
    sub.add_parser("info", help="versions and which kernel backends are live (same as python -m sparsekit.info)")
    return p


def _fail(msg: str) -> int:
    print(f"sparsekit: error: {msg}", file=sys.stderr)
    return 2


def _versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"sparsekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads()}


def _table(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows)


def _progress(args) -> bool:
    """Whether to show progress bars; with --no-progress, transformers' own bars (GGUF loading) go too."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not args.no_progress


def run_prune(args) -> int:
    import torch

    import math

    from . import data, distributed, evaluate
    from .checkpoint import check_output_dir, save_pruned_model
    from .models import load_model, resolve_model
    from .prune import PruneSpec, parse_pattern, prune_model

    # Validate everything cheap before the long work starts.
    spec = PruneSpec(args.method, args.sparsity, parse_pattern(args.pattern), blocksize=args.blocksize,
                     percdamp=args.percdamp, profile=args.sparsity_profile, owl_m=args.owl_m,
                     owl_lambda=args.owl_lambda)
    check_output_dir(args.output, args.overwrite, reads=resolve_model(args.model).folder)
    calib_text = data.read_text(args.calib)
    eval_text = data.read_text(args.eval)
    if args.eval_tokens < 1:
        raise data.DataError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _progress(args)
    if args.activations_on_cpu and not args.offload:
        raise ValueError("--activations-on-cpu goes with --offload")
    if args.offload:
        return _run_prune_offload(args, spec, calib_text, eval_text, progress)

    rank, world = distributed.init_from_env(args.device)  # torchrun: split calibration over the ranks
    args.device = distributed.device_for_rank(args.device)
    progress = progress and rank == 0
    t_start = time.perf_counter()
    if rank == 0:
        print(f"loading {args.model} ({args.dtype}, {args.device})"
              + (f" on {world} ranks" if world > 1 else ""), file=sys.stderr)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    check_seqlen_fits(model, args.seqlen)
    calib = data.calibration_windows(data.tokenize(tokenizer, calib_text), args.nsamples, args.seqlen, args.seed,
                                     source=args.calib)
    calib = distributed.shard(calib)
    eval_ids = data.tokenize(tokenizer, eval_text)
    windows = data.eval_windows(eval_ids, args.seqlen, args.eval_tokens, source=args.eval)
    t_loaded = time.perf_counter()

    def ppl(desc: str) -> float:  # each rank scores its share of the windows; the sums are all-reduced
        mine = windows[rank::world]
        nll, count = evaluate.window_nll(model, mine, progress=progress, desc=desc) if mine.numel() else (0.0, 0)
        tot = distributed.all_reduce_sum_(torch.tensor([nll, float(count)], dtype=torch.float64))
        return math.exp(float(tot[0]) / float(tot[1]))

    dense_ppl = ppl("dense ppl")
    t_dense = time.perf_counter()
    report = prune_model(model, spec, calib, progress=progress)
    pruned_ppl = ppl("pruned ppl")
    t_end = time.perf_counter()

    out = _prune_report(args, spec, report, dense_ppl, pruned_ppl, windows, world_size=world, seconds={
        "load": t_loaded - t_start, "dense_eval": t_dense - t_loaded, "prune": report.seconds,
        "pruned_eval": t_end - t_dense - report.seconds, "total": t_end - t_start})
    if rank != 0:  # rank 0 writes; the others wait so that the command ends when the folder exists
        distributed.barrier()
        return 0
    if args.save_compressed:
        from .compressed import save_compressed
        from .sparsify import sparsify_

        sparsify_(model)
        plain = save_compressed(model, args.output, tokenizer=tokenizer, report=out,
                                overwrite=args.overwrite)["plain_transformers_loadable"]
        manifest = True
    else:  # True: save_pretrained wrote it (no manifest); False: save_compressed did
        plain = save_pruned_model(model, tokenizer, args.output, out, overwrite=args.overwrite)
        manifest = not plain
    distributed.barrier()

    _print_prune_table(spec, report, dense_ppl, pruned_ppl)
    print(f"eval: {windows.shape[0]} windows x {args.seqlen} tokens of {args.eval}; "
          f"total {t_end - t_start:.1f} s; saved to {args.output}/ (report.json)")
    print(loader_line(args.output, plain, manifest))
    return 0


def loader_line(folder: str, plain: bool, manifest: bool = True) -> str:
    """The last line of the commands that save a model: which loader rebuilds the folder. ``plain``: from_pretrained
    can; ``manifest``: the folder has save_compressed's sparsekit.json (load_compressed needs it)."""
    if plain:
        also = f" or sparsekit.load_compressed({folder!r})" if manifest else ""
        return f"load it with AutoModelForCausalLM.from_pretrained({folder!r}){also}"
    return (f"load it with sparsekit.load_compressed({folder!r}) (or `sparsekit eval/bench --model {folder}`): its "
            "layers are packed, shrunk per layer or low-rank, or carry head counts its config cannot state, "
            "so from_pretrained cannot rebuild it")


def _prune_report(args, spec, report, dense_ppl: float, pruned_ppl: float, windows, world_size: int,
                  seconds: dict) -> dict:
    """report.json of `sparsekit prune` (in memory and --offload)."""
    from .offload import peak_rss_bytes

    return {
        "model": args.model, "method": spec.method, "pattern": spec.pattern_str, "sparsity_profile": spec.profile,
        "target_sparsity": float(spec.sparsity), "sparsity": report.sparsity,
        "dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "prune_seconds": report.seconds,
        "world_size": world_size, "peak_rss_bytes": peak_rss_bytes(),
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "eval": args.eval, "eval_tokens": int(windows.numel()), "eval_windows": int(windows.shape[0]),
        "dtype": args.dtype, "device": args.device, "seconds": seconds, "versions": _versions(),
        "block_sparsities": report.block_sparsities, "outlier_ratios": report.outlier_ratios,
        "layers": report.to_dict()["layers"],
    }


def _print_prune_table(spec, report, dense_ppl: float, pruned_ppl: float) -> None:
    print(_table([
        ("", "dense", f"{spec.method} {spec.pattern_str}"),
        ("perplexity", f"{dense_ppl:.4f}", f"{pruned_ppl:.4f}"),
        ("sparsity (pruned linears)", "-", f"{report.sparsity:.4f}"),
        ("prune time (s)", "", f"{report.seconds:.1f}"),
    ]))


def _run_prune_offload(args, spec, calib_text: str, eval_text: str, progress: bool) -> int:
    """``sparsekit prune --offload``: the same pipeline, one decoder layer in memory at a time."""
    import math

    import torch

    from . import data, distributed
    from .checkpoint import atomic_output_dir
    from .models import _DTYPES, resolve_model
    from .offload import OffloadedModel, OffloadWriter
    from .prune import prune_model

    src = resolve_model(args.model)
    if src.gguf_file:
        raise ValueError(f"--offload reads a safetensors checkpoint folder; {args.model} is a GGUF file. Save it "
                         "with `sparsekit prune ... --sparsity 0 --output DIR` (or save_pretrained) first")
    from .compressed import MANIFEST

    manifest_path = os.path.join(src.folder, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if not json.load(f).get("plain_transformers_loadable", False):
                raise ValueError(f"--offload reads a plain transformers checkpoint; {args.model} was written by "
                                 "sparsekit.save_compressed with layers its config does not describe (contextual, "
                                 "laser or --save-compressed): prune it without --offload")
    if distributed.world_size() > 1 or os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--offload runs in one process; do not combine it with torchrun")
    if args.save_compressed:
        raise ValueError("--offload writes a sharded dense checkpoint; --save-compressed needs the whole model in "
                         "memory (load the output with sparsekit.sparsify_ afterwards)")
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    print(f"offloading {args.model} ({args.dtype}, {args.device}): one decoder layer in memory at a time",
          file=sys.stderr)
    om = OffloadedModel(src.folder, _DTYPES[args.dtype], args.device,
                        activations_device="cpu" if args.activations_on_cpu else None)
    check_seqlen_fits(om.model, args.seqlen)
    tokenizer = AutoTokenizer.from_pretrained(src.folder)
    calib = data.calibration_windows(data.tokenize(tokenizer, calib_text), args.nsamples, args.seqlen, args.seed,
                                     source=args.calib)
    windows = data.eval_windows(data.tokenize(tokenizer, eval_text), args.seqlen, args.eval_tokens, source=args.eval)
    t_loaded = time.perf_counter()
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        nll, count = om.window_nll(windows, progress=progress, desc="dense ppl")
        dense_ppl = math.exp(nll / count)
        t_dense = time.perf_counter()
        writer = OffloadWriter(om, tmp)
        report = prune_model(om.model, spec, calib, progress=progress, layer_io=writer)
        written = writer.finish()
        t_pruned = time.perf_counter()
        nll, count = om.window_nll(windows, reader=written, progress=progress, desc="pruned ppl")
        pruned_ppl = math.exp(nll / count)
        t_end = time.perf_counter()
        writer.write_config()
        tokenizer.save_pretrained(tmp)
        out = _prune_report(args, spec, report, dense_ppl, pruned_ppl, windows, world_size=1, seconds={
            "setup": t_loaded - t_start, "dense_eval": t_dense - t_loaded, "prune": t_pruned - t_dense,
            "pruned_eval": t_end - t_pruned, "total": t_end - t_start})
        out.update({"offload": True, "activations_on_cpu": bool(args.activations_on_cpu),
                    "model_bytes": om.parameter_bytes, "checkpoint_bytes": om.reader.nbytes()})
        if torch.cuda.is_available() and om.device.type == "cuda":
            out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(om.device)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    _print_prune_table(spec, report, dense_ppl, pruned_ppl)
    print(f"offload: model {om.parameter_bytes / 2**30:.2f} GiB in {args.dtype}, peak RSS "
          f"{out['peak_rss_bytes'] / 2**30:.2f} GiB; total {t_end - t_start:.1f} s; saved to {args.output}/")
    print(loader_line(args.output, plain=True, manifest=False))
    return 0


def run_eval(args) -> int:
    from . import data, evaluate, tasks
    from .checkpoint import check_writable_parent
    from .models import load_model, resolve_model

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2 (a window predicts seqlen - 1 tokens), got {args.seqlen}")
    if args.eval_tokens < 1:
        raise ValueError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 (omit it for every question), got {args.limit}")
    resolve_model(args.model)
    if args.output:  # fail before the evaluation, not after it
        if os.path.isdir(args.output):
            raise ValueError(f"--output {args.output} is a folder; give a file name (e.g. results.json)")
        check_writable_parent(args.output, f"--output {args.output}")
    kinds = {}
    for name in names:  # validate every task before loading the model
        if tasks.is_perplexity_text(name):  # a missing .txt / .jsonl path: a missing file, not an unknown task
            kinds[name] = ("ppl", data.read_text(name))
        else:
            kinds[name] = ("mc", tasks.load_task(name, args.data_dir, args.limit))
    progress = _progress(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    if any(kind == "ppl" for kind, _ in kinds.values()):
        check_seqlen_fits(model, args.seqlen)
    results = {}
    for name, (kind, payload) in kinds.items():
        if kind == "ppl":
            windows = data.eval_windows(data.tokenize(tokenizer, payload), args.seqlen, args.eval_tokens, name)
            results[name] = {"ppl": evaluate.perplexity(model, windows, progress=progress, desc=name),
                             "tokens": int(windows.numel())}
        else:
            results[name] = tasks.score_multiple_choice(model, tokenizer, payload, progress=progress, desc=name)
    rows = [("task", "metric", "value")]
    for name, r in results.items():
        if "ppl" in r:
            rows.append((name, f"perplexity ({r['tokens']} tok)", f"{r['ppl']:.4f}"))
        else:
            rows.append((name, f"acc / acc_norm (n={r['n']})", f"{r['acc']:.4f} / {r['acc_norm']:.4f}"))
    print(_table(rows))
    if args.output:
        from .checkpoint import write_text_atomic

        write_text_atomic(args.output, json.dumps({"model": args.model, "results": results, "versions": _versions()},
                                                  indent=2))
    return 0


def _terminate_like_interrupt() -> None:
    """SIGTERM (``kill``, a scheduler's timeout) unwinds like Ctrl-C, so the atomic writers remove their hidden
    temporary folders instead of leaving them next to OUTPUT (Python's default SIGTERM exits without cleanup)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


def _check_common_args(args) -> None:
    """--threads and --device, for every command that has them, before anything is loaded."""
    import torch

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    device = getattr(args, "device", None)
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "meta":
        raise ValueError(f"--device {device}: meta tensors hold no data to calibrate, prune or evaluate; use cpu "
                         "or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA" if not torch.version.cuda else "no CUDA device is visible"
        raise ValueError(f"--device {device}: {why}")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: plain-PyTorch paths only, where this torch has the device
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch's first sentence
            raise ValueError(f"--device {device}: this torch cannot use it ({why})") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_seqlen_fits(model, seqlen: int, option: str = "--seqlen") -> None:
    """A window longer than the model's positions fails deep in its embedding: name it instead."""
    from .data import DataError
    from .models import max_positions

    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise DataError(f"{option} {seqlen} is longer than the model's {limit} positions; pass {option} <= {limit}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main()
    from .checkpoint import OutputExistsError
    from .data import DataError
    from .models import ModelNotFoundError

    from . import cli_bench, cli_contextual, cli_laser
    from .contextual import ContextualError
    from .sparsegpt import SparseGPTError

    _terminate_like_interrupt()
    try:
        _check_common_args(args)
    except ValueError as e:
        return _fail(str(e))
    runners = {"eval": run_eval, "prune": run_prune, "contextual": cli_contextual.run, "bench": cli_bench.run,
               "laser": cli_laser.run}
    try:
        return runners[args.command](args)
    except (ValueError, DataError, ContextualError, SparseGPTError, ModelNotFoundError, OutputExistsError,
            PermissionError, FileNotFoundError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
