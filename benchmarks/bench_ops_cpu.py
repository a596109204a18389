"""Time sparsekit's CPU C++ kernels against the plain-PyTorch reference implementations, on shapes from
real models, and print a markdown table (median times, speedup, effective GB/s for the streaming ops).

    python benchmarks/bench_ops_cpu.py                 # SmolLM2-135M shapes, torch's default thread count
    python benchmarks/bench_ops_cpu.py --threads 1 --models smollm2-135m smollm2-1.7b

The C++ kernel is reached through the dispatcher (``torch.ops.sparsekit.*`` on CPU tensors), the reference
by calling ``sparsekit.ops.reference`` directly, in the same process and on the same inputs. Timing is
``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks). Nothing is written to disk.

A plain script rather than pytest-benchmark: the point is the ratio between two implementations in one
table, which pytest-benchmark reports only as separate rows.
"""

from __future__ import annotations

import argparse
import datetime

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from their folder)
from torch.utils import benchmark

import sparsekit
from sparsekit.ops import reference as R

# (out_features, in_features) of the pruned linear layers; activations are (tokens, in_features).
MODEL_SHAPES = {
    "smollm2-135m": {"mlp.up": (1536, 576), "mlp.down": (576, 1536), "attn.k": (192, 576)},
    "smollm2-360m": {"mlp.up": (2560, 960), "mlp.down": (960, 2560)},
    "smollm2-1.7b": {"mlp.up": (8192, 2048), "mlp.down": (2048, 8192)},
}


def median_ms(fn, min_run_time: float) -> float:
    fn()  # first-call costs (lazy kernel init, page faults on fresh outputs) are not what we measure
    # num_threads: Timer runs single-threaded unless told otherwise, which would make --threads a no-op
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def cases(models: list[str], tokens: int):
    """Yield (op, layer, shape text, dtype, reference fn, C++ fn, bytes moved by one call or None)."""
    for model in models:
        for layer, (out_f, in_f) in MODEL_SHAPES[model].items():
            name = f"{model}.{layer}"
            shape = f"{out_f}x{in_f}"
            for dtype in (torch.float32, torch.bfloat16):
                w = torch.randn(out_f, in_f).to(dtype)
                sq = torch.rand(in_f) * 100
                moved = w.numel() * (w.element_size() + 4)
                yield ("wanda_score", name, shape, dtype, lambda w=w, sq=sq: R.wanda_score_reference(w, sq),
                       lambda w=w, sq=sq: torch.ops.sparsekit.wanda_score(w, sq), moved)
            score = torch.randn(out_f, in_f)
            yield ("nm_mask 2:4", name, shape, torch.float32, lambda s=score: R.nm_mask_reference(s, 2, 4),
                   lambda s=score: torch.ops.sparsekit.nm_mask(s, 2, 4), None)
            half = in_f // 2
            yield ("rowwise 50%/row", name, shape, torch.float32,
                   lambda s=score: R.rowwise_prune_mask_reference(s, half),
                   lambda s=score: torch.ops.sparsekit.rowwise_prune_mask(s, half), None)
            flat, k = score.reshape(1, -1), score.numel() // 2
            yield ("rowwise 50%/matrix", name, f"1x{score.numel()}", torch.float32,
                   lambda s=flat: R.rowwise_prune_mask_reference(s, k),
                   lambda s=flat: torch.ops.sparsekit.rowwise_prune_mask(s, k), None)
        # Calibration statistics: inputs of the attention/up projections and of the down projection.
        for layer, (out_f, in_f) in MODEL_SHAPES[model].items():
            if layer not in ("mlp.up", "mlp.down"):
                continue
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(tokens, in_f).to(dtype)
                acc = torch.zeros(in_f)
                yield ("channel_sqnorm", f"{model}.{layer}.input", f"{tokens}x{in_f}", dtype,
                       lambda acc=acc, x=x: R.channel_sqnorm_accumulate_reference_(acc, x),
                       lambda acc=acc, x=x: torch.ops.sparsekit.channel_sqnorm_accumulate_(acc, x),
                       x.numel() * x.element_size())
                sq, ab = torch.zeros(in_f), torch.zeros(in_f)
                yield ("channel_stats", f"{model}.{layer}.input", f"{tokens}x{in_f}", dtype,
                       lambda sq=sq, ab=ab, x=x: R.channel_stats_accumulate_reference_(sq, ab, x),
                       lambda sq=sq, ab=ab, x=x: torch.ops.sparsekit.channel_stats_accumulate_(sq, ab, x),
                       x.numel() * x.element_size())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=sorted(MODEL_SHAPES),
                        help="model shape sets to time (default: smollm2-135m)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="calibration tokens for channel_sqnorm / channel_stats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = sparsekit.backend_status()["cpu"]
    if not cpu.live:
        raise SystemExit(f"the CPU C++ backend is not live ({cpu.detail}); nothing to compare")

    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}")
    print()
    print("| op | layer | shape | dtype | reference ms | C++ ms | speedup | C++ GB/s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for op, layer, shape, dtype, ref_fn, cpp_fn, moved in cases(args.models, args.tokens):
        t_ref = median_ms(ref_fn, args.min_run_time)
        t_cpp = median_ms(cpp_fn, args.min_run_time)
        gbs = f"{moved / t_cpp / 1e6:.1f}" if moved else "-"
        dt = str(dtype).removeprefix("torch.")
        print(f"| {op} | {layer} | {shape} | {dt} | {t_ref:.3f} | {t_cpp:.3f} | {t_ref / t_cpp:.1f}x | {gbs} |",
              flush=True)


if __name__ == "__main__":
    main()
