"""``sparsekit bench``: decode speed of a pruned model, dense (masked) against sparsified, in one process.

Wired into ``sparsekit.cli`` by ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

__all__ = ["add_parser", "run", "BENCH_EPILOG"]

BENCH_EPILOG = """\
examples:
  # prune once, then compare decode speed of the dense (masked) and the sparse model:
  sparsekit prune --model smollm2-135m --method wanda --pattern 2:4 --output runs/w24
  sparsekit bench --model runs/w24

  # unstructured 50%, bitmap format, 4 sequences at a time, 128 new tokens each:
  sparsekit bench --model runs/wanda50 --format bitmap --batch 4 --new-tokens 128

  # keep a dense copy for the calls where the sparse kernels lose (faster prefill, more memory):
  sparsekit bench --model runs/w24 --dense-fallback cache

what it does:
  1. loads the model (it must already be pruned: `sparsekit prune` output, or a `save_compressed` folder);
  2. keeps it as the dense baseline (a pruned weight stored dense: F.linear does not skip zeros) and swaps
     a copy's pruned linear layers for SparseLinear (sparsekit.sparsify_, LM head left dense);
  3. generates greedily from the same prompt (--prompt-tokens tokens of WikiText-2, --batch copies) with
     both models in turn, --repeats rounds after a warm-up, and prints a table.

decode tokens/s = batch * (new_tokens - 1) / (time from the first generated token to the last), clocked
at each generation step: the prefill is left out, so the figure is the per-token decode speed. "same tokens" says
whether both models generated identical token ids (float rounding may flip a near-tie after many tokens).
Both models are timed in the same process, taking turns, so a drifting machine hits them alike; other jobs
on the machine still add noise (the load average is printed).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    from .models import BUILTIN_MODELS

    p = subparsers.add_parser(
        "bench", help="decode tokens/s of a pruned model: dense (masked) vs SparseLinear, same process",
        description="Measure decode speed (tokens/s) of a pruned model stored dense against the same model with "
                    "its pruned linear layers swapped for SparseLinear, in one process.",
        epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"pruned model: a local folder (sparsekit prune / save_compressed output) or a built-in "
                        f"name ({', '.join(BUILTIN_MODELS)}; not pruned, so nothing to swap)")
    p.add_argument("--format", default="auto",
                   help="SparseLinear format: auto (2:4 where a layer fits, else bitmap), 2:4, 4:8, N:M or bitmap "
                        "(default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model, median reported "
                                                          "(default %(default)s)")
    p.add_argument("--dense-fallback", default="unpack", choices=["unpack", "cache"],
                   help="SparseLinear storage for calls where the sparse kernels lose: unpack (packed weight only) "
                        "or cache (also a dense copy in memory) (default %(default)s)")
    p.add_argument("--cslt", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, let 2:4 float16/bfloat16 layers use cuSPARSELt where sparsekit's own kernels are "
                        "not chosen (--no-cslt: the dense fallback instead, and no cuSPARSELt copy in memory)")
    p.add_argument("--min-sparsity", type=float, default=0.5,
                   help="swap linear layers with at least this fraction of zeros (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models' forward (fullgraph, static KV cache); compile time is not timed")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def _say(args, msg: str) -> None:
    if not args.no_progress:
        print(msg, file=sys.stderr, flush=True)


def _densify(model):
    """A copy of ``model`` with every SparseLinear turned back into nn.Linear (the dense baseline)."""
    import torch
    from torch import nn

    from .nn import SparseLinear

    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SparseLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.values.device, dtype=mod.values.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.to_dense())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, lin.eval())
    return dense


def _prompt(tokenizer, n_tokens: int, batch: int, vocab_size: int):
    import torch

    from . import data

    ids = data.tokenize(tokenizer, data.read_text("wikitext2-test"))[:n_tokens]
    if ids.numel() < n_tokens:  # tiny test tokenizers: pad with token ids cycled
        ids = torch.arange(n_tokens) % vocab_size
    return ids.reshape(1, -1).repeat(batch, 1)


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def static_cache(model, ids, new_tokens: int):
    """One static KV cache for every timed ``generate`` of ``model`` on prompts shaped like ``ids``.

    Given ``cache_implementation="static"``, transformers builds a fresh StaticCache on every call, at new
    addresses; a model compiled with CUDA graphs ("reduce-overhead") then re-records its graphs inside the timed
    decode. One cache, reset in place before each call, keeps the addresses."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)


def _timed_generate(model, ids, new_tokens: int, static: bool, cache=None):
    """Greedy generate; returns (prefill + first token seconds, decode seconds for the other tokens, ids).
    static: a static KV cache, ``cache`` (from ``static_cache``, reset here) where given, else a fresh one."""
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([clock]))
    reuse = static and cache is not None
    if reuse:
        kw["past_key_values"] = cache  # reset below, in inference mode: its tensors were made there
    elif static:
        kw["cache_implementation"] = "static"
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        kw["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    with torch.inference_mode():
        if reuse:
            cache.reset()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate made {len(clock.stamps)} steps, expected {new_tokens}")
    return clock.stamps[0] - t0, clock.stamps[-1] - clock.stamps[0], out


def _versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"sparsekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def run(args) -> int:
    """Run ``sparsekit bench``; returns the process exit code."""
    import torch

    from . import backend_status
    from .models import load_model, resolve_model
    from .nn.sparse_linear import cpu_sparse_kernels_fast, parse_format
    from .sparsify import sparsify_

    for flag, value in (("--batch", args.batch), ("--new-tokens", args.new_tokens),
                        ("--prompt-tokens", args.prompt_tokens), ("--repeats", args.repeats)):
        if value < 1:
            print(f"sparsekit bench: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.new_tokens < 2:
        print("sparsekit bench: error: --new-tokens must be >= 2 (decode speed needs tokens after the first)",
              file=sys.stderr)
        return 2
    if args.format != "auto":
        parse_format(args.format)
    if args.output:  # before minutes of timing, not after
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            print(f"sparsekit bench: error: --output {args.output}: the folder {folder} does not exist or cannot be "
                  "written", file=sys.stderr)
            return 2
    resolve_model(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    load_before = os.getloadavg()[0]
    _say(args, f"[1/4] loading {args.model} ({args.dtype}, {args.device})")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    from .cli import check_seqlen_fits

    check_seqlen_fits(model, args.prompt_tokens + args.new_tokens, "--prompt-tokens + --new-tokens")
    dense = _densify(model)
    _say(args, f"[2/4] sparsifying a copy (format {args.format}, dense fallback {args.dense_fallback})")
    sparse = copy.deepcopy(dense)
    report = sparsify_(sparse, format=args.format, min_sparsity=args.min_sparsity,
                       dense_fallback=args.dense_fallback, cslt=args.cslt)
    del model
    if not report.layers:
        print(f"sparsekit bench: error: no linear layer of {args.model} has at least {args.min_sparsity:.0%} "
              "zeros: prune it first (sparsekit prune ... --output DIR, then --model DIR)", file=sys.stderr)
        return 2
    formats = sorted({r.format for r in report.layers})
    _say(args, f"      swapped {len(report.layers)} linear layers ({', '.join(formats)}): "
               f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB"
               + (f" + {report.cache_bytes / 2**20:.1f} MiB dense cache" if report.cache_bytes else ""))

    models = {"dense": dense, "sparse": sparse}
    for m in models.values():
        m.eval()
        m.generation_config.use_cache = True
    if args.compile:
        _say(args, "      compiling both models (torch.compile fullgraph, static cache): minutes on a small CPU")
        for m in models.values():
            m.forward = torch.compile(m.forward, fullgraph=True)
    ids = _prompt(tokenizer, args.prompt_tokens, args.batch, dense.config.vocab_size).to(args.device)
    caches = {name: static_cache(m, ids, args.new_tokens) if args.compile else None for name, m in models.items()}

    _say(args, f"[3/4] warm-up: generate {args.new_tokens} tokens with each model")
    outputs = {}
    for name, m in models.items():
        outputs[name] = _timed_generate(m, ids, args.new_tokens, args.compile, caches[name])[2]
    same = bool(torch.equal(outputs["dense"], outputs["sparse"]))

    times = {name: {"prefill": [], "decode": []} for name in models}
    steps = args.batch * (args.new_tokens - 1)
    for r in range(args.repeats):
        for name, m in models.items():
            prefill, decode, _ = _timed_generate(m, ids, args.new_tokens, args.compile, caches[name])
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
        _say(args, f"[4/4] round {r + 1}/{args.repeats}: dense {steps / times['dense']['decode'][-1]:.1f} tok/s, "
                   f"sparse {steps / times['sparse']['decode'][-1]:.1f} tok/s")
    load_after = os.getloadavg()[0]

    results = {}
    for name, t in times.items():
        results[name] = {"decode_tokens_per_s": steps / statistics.median(t["decode"]),
                         "prefill_and_first_token_s": statistics.median(t["prefill"])}
    speedup = results["sparse"]["decode_tokens_per_s"] / results["dense"]["decode_tokens_per_s"]
    fast, why = cpu_sparse_kernels_fast()
    rows = [("", "dense (masked)", f"sparse ({', '.join(formats)})"),
            ("decode tokens/s", f"{results['dense']['decode_tokens_per_s']:.1f}",
             f"{results['sparse']['decode_tokens_per_s']:.1f}"),
            ("speedup", "1.00x", f"{speedup:.2f}x"),
            ("prefill + 1st token (s)", f"{results['dense']['prefill_and_first_token_s']:.3f}",
             f"{results['sparse']['prefill_and_first_token_s']:.3f}"),
            ("swapped linear weights (MiB)", f"{report.bytes_before / 2**20:.1f}",
             f"{report.bytes_after / 2**20:.1f}" + (f" + {report.cache_bytes / 2**20:.1f} cache"
                                                    if report.cache_bytes else "")),
            ("same tokens", "", "yes" if same else "no")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print("\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows))
    print(f"{args.model}: batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads, median of {args.repeats} rounds"
          f"{', compiled' if args.compile else ''}; CPU sparse kernels: {why}; "
          f"load average {load_before:.2f} -> {load_after:.2f}")
    if args.output:
        out = {"model": args.model, "format": args.format, "formats": formats, "batch": args.batch,
               "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
               "dtype": args.dtype, "device": args.device, "dense_fallback": args.dense_fallback, "cslt": args.cslt,
               "compile": args.compile, "results": results, "speedup": speedup, "same_tokens": same,
               "sparsify": report.to_dict(), "cpu_sparse_kernels": {"fast": fast, "why": why},
               "backends": {k: v.detail for k, v in backend_status().items()},
               "load_average": [load_before, load_after], "versions": _versions(),
               "times_s": times}
        from .checkpoint import write_text_atomic

        write_text_atomic(args.output, json.dumps(out, indent=2) + "\n")
    return 0
