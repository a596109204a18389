"""Calibration overhead: what collecting statistics costs on top of a decoder layer's own forward pass.

For one decoder layer (SmolLM2-135M's real layer 15 by default, or a random Llama layer of a given size), over
the same calibration tokens, times (median of interleaved repeats):

* forward      the layer alone (the work calibration has to do anyway);
* + norms      with the statistics engine accumulating sum x^2 per channel (Wanda) for every linear group;
* + norms,|x|  also sum |x| (contextual pruning);
* + X^T X      also the Hessian X^T X of every group (SparseGPT).

Also the Hessian memory with groups (q/k/v share one, gate/up share one) against one per linear.

    python benchmarks/bench_calibration_overhead.py                    # SmolLM2-135M layer, 16 x 512 tokens
    python benchmarks/bench_calibration_overhead.py --random 2048,5632 # a random Llama layer, hidden 2048
    python benchmarks/bench_calibration_overhead.py --dtype bfloat16   # the model in bfloat16

The statistics are accumulated in float32 whatever the model's dtype.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import DTYPES, cpu_name  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def layer_and_inputs(args):
    from sparsekit import data
    from sparsekit.calibrate import capture_layer_inputs, run_layer
    from sparsekit.models import find_decoder_layers, load_model

    if args.random:
        import transformers as tf

        hidden, inter = (int(x) for x in args.random.split(","))
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 256), num_hidden_layers=1, vocab_size=1024)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval().to(DTYPES[args.dtype])
        windows = torch.randint(0, 1024, (args.nsamples, args.seqlen))
        name = f"random Llama layer (hidden {hidden}, MLP {inter})"
    else:
        model, tok = load_model("smollm2-135m", dtype=args.dtype)
        ids = data.tokenize(tok, data.read_text("wikitext2-valid"))
        windows = data.calibration_windows(ids, args.nsamples, args.seqlen, 0)
        name = f"SmolLM2-135M decoder layer {args.layer}"
    layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, windows)
    scratch = torch.empty_like(inputs.hidden)
    for i in range(min(args.layer, len(layers) - 1)):
        run_layer(layers[i], inputs, scratch)
        inputs.hidden, scratch = scratch, inputs.hidden
    return name, layers[min(args.layer, len(layers) - 1)], inputs, scratch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--random", default=None, metavar="HIDDEN,MLP")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's dtype (default float32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/calibration_overhead_cpu.md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from sparsekit.calibrate import collect_input_stats, run_layer
    from sparsekit.models import find_linears, linear_weight

    name, layer, inputs, scratch = layer_and_inputs(args)
    linears = find_linears(layer)
    variants = {
        "forward": lambda: run_layer(layer, inputs, scratch),
        "+ norms (Wanda)": lambda: collect_input_stats(layer, linears, inputs, scratch),
        "+ norms, abs sum (contextual)": lambda: collect_input_stats(layer, linears, inputs, scratch, abs_sum=True),
        "+ X^T X (SparseGPT)": lambda: collect_input_stats(layer, linears, inputs, scratch, hessian=True,
                                                           abs_sum=True),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in variants.items():  # interleaved, so that machine noise hits every variant alike
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward"]
    stats = collect_input_stats(layer, linears, inputs, scratch, hessian=True)
    groups = {id(s): s for s in stats.values()}
    grouped = sum(s.xtx.numel() * 4 for s in groups.values())
    per_linear = sum(linear_weight(m).shape[1] ** 2 * 4 for m in linears.values())
    tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
    lines = [
        f"# Calibration overhead ({name}, CPU)\n",
        f"Measured {datetime.date.today()} on {cpu_name()} ({torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, transformers {transformers.__version__}; model in {args.dtype}; "
        f"{args.nsamples} x {args.seqlen} = {tokens} tokens; median of {args.repeats} interleaved repeats.\n",
        "| pass | seconds | overhead over the forward |",
        "|---|---:|---:|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.3f} | {'-' if k == 'forward' else f'{(v / base - 1) * 100:+.1f}%'} |")
    lines += [
        "",
        f"Linear groups reading the same input (found by tensor identity): {len(groups)} groups for "
        f"{len(linears)} linears ({', '.join(sorted({' / '.join(sorted(n for n, s in stats.items() if s is g)) for g in groups.values()}))}).",
        f"Hessian memory (float32): {grouped / 2**20:.2f} MiB with shared groups, {per_linear / 2**20:.2f} MiB with one "
        f"per linear ({per_linear / grouped:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or os.path.join(HERE, "results", "calibration_overhead_cpu.md")
    mode = "a" if os.path.exists(out) and args.out is None and args.random else "w"
    with open(out, mode) as f:
        f.write(("\n" if mode == "a" else "") + text)


if __name__ == "__main__":
    main()
