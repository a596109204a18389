"""Time sparsekit's CUDA ops against the measured copy bandwidth of the device they run on.

For each op: the CUDA C++ kernel (``torch.ops.sparsekit.*`` when ``sparsekit._C_cuda`` is loaded), the Triton
kernel (``sparsekit.kernels.triton.dispatch``, called directly) and the plain-PyTorch reference, each timed
as the median of ``triton.testing.do_bench`` in this one process, on the shapes below:

* channel_sqnorm_accumulate_ (sum x^2) and channel_stats_accumulate_ (sum x^2 and sum |x| together) on
  16384 tokens of Llama-2-7B hidden states (bf16): each reads x once, so its GB/s (bytes of x over time) is
  set next to a device-to-device copy of the same bytes, timed here (reported as read + written bytes over
  time, the way copy bandwidth is quoted). Target: >= 70 % of it, and faster than the plain-PyTorch
  reference (which reads x twice for the two statistics).
* wanda_score and nm_mask on Llama-2-7B's mlp.down_proj weight (4096, 11008).

Every implementation is checked against the reference before it is timed. Writes ``bench_ops_gpu.csv`` and
``bench_ops_gpu.md`` (device, driver, torch, CUDA and triton versions, date) into --out.

    python benchmarks/bench_ops_gpu.py [--out benchmarks/results] [--rep 200]

``--device cpu`` checks the script itself without a GPU (tests/test_gpu_scripts.py does): small shapes, the CPU
C++ kernels in place of the CUDA C++ ones, Triton only under TRITON_INTERPRET=1, a wall-clock median for timing;
nothing it prints is a speed figure.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import RESULTS, device_name, doc_parser, gpu_bench_timer, triton_runs_on  # noqa: E402

# Shapes from real models, by name.
SHAPES = {
    "llama2-7b.hidden x 16384 tokens": (16384, 4096),
    "llama2-7b.mlp.down_proj": (4096, 11008),
}
SMOKE_SHAPES = {  # --device cpu: the same cases, small
    "llama2-7b.hidden x 16384 tokens": (512, 264),
    "llama2-7b.mlp.down_proj": (128, 264),
}
CHANNEL_STATS_TARGET = 0.70  # fraction of copy bandwidth the channel-stats kernels must reach


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


FAILURES: list[str] = []


def _close(what: str, got, expect, rtol) -> bool:
    """True when got matches expect; else prints and records the failure (the implementation is not timed)."""
    try:
        torch.testing.assert_close(got, expect, rtol=rtol, atol=0)
        return True
    except AssertionError as e:
        print(f"WRONG RESULT: {what}: {str(e).splitlines()[0]}; not timed", flush=True)
        FAILURES.append(what)
        return False


def _implementations(device):
    """name -> (nm_mask, wanda_score, channel_sqnorm_accumulate_, channel_stats_accumulate_) for every
    implementation live on ``device`` (CUDA; the CPU only to check the script)."""
    import sparsekit
    from sparsekit.kernels.triton import dispatch
    from sparsekit.ops import reference

    impls = {}
    ops = torch.ops.sparsekit
    gpu = torch.device(device).type == "cuda"
    if sparsekit.backend_status()["cuda" if gpu else "cpu"].live:
        impls["CUDA C++" if gpu else "CPU C++"] = (ops.nm_mask, ops.wanda_score, ops.channel_sqnorm_accumulate_,
                                                   ops.channel_stats_accumulate_)
    if triton_runs_on(device):
        impls["Triton"] = (dispatch.nm_mask, dispatch.wanda_score, dispatch.channel_sqnorm_accumulate_,
                           dispatch.channel_stats_accumulate_)
    impls["reference"] = (reference.nm_mask_reference, reference.wanda_score_reference,
                          reference.channel_sqnorm_accumulate_reference_,
                          reference.channel_stats_accumulate_reference_)
    return impls


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--out", default=RESULTS,
                        help="folder for bench_ops_gpu.csv and bench_ops_gpu.md (default: benchmarks/results/)")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, milliseconds (default 25)")
    parser.add_argument("--rep", type=float, default=200, help="do_bench repetition time, milliseconds (default 200)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only checks the script)")
    args = parser.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: cuda, or cpu to check the script")
    gpu = dev.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("bench_ops_gpu.py needs a CUDA device: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}). Nothing was timed.", file=sys.stderr)
        return 1
    import triton

    from sparsekit.ops import reference

    bench = gpu_bench_timer(dev, args.warmup, args.rep)
    shapes = SHAPES if gpu else SMOKE_SHAPES
    torch.manual_seed(0)
    FAILURES.clear()
    impls = _implementations(dev)
    rows = []  # dicts for the CSV

    def record(op, shape_name, shape, dtype, impl, ms, nbytes, copy_gbs=None, ref_ms=None):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({
            "op": op, "shape_name": shape_name, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
            "impl": impl, "median_ms": f"{ms:.4f}", "GB/s": f"{gbs:.0f}",
            "pct_of_copy": f"{100 * gbs / copy_gbs:.0f}" if copy_gbs else "",
            "speedup_vs_reference": f"{ref_ms / ms:.2f}" if ref_ms else "",
        })
        return gbs

    # --- channel_sqnorm_accumulate_ against copy bandwidth --------------------------------------------
    name = "llama2-7b.hidden x 16384 tokens"
    shape = shapes[name]
    x = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    copy_gbs = 2 * nbytes / (copy_ms * 1e-3) / 1e9  # read + write
    rows.append({"op": "copy_ (ceiling)", "shape_name": name, "shape": "x".join(map(str, shape)), "dtype": "bfloat16",
                 "impl": "torch", "median_ms": f"{copy_ms:.4f}", "GB/s": f"{copy_gbs:.0f}", "pct_of_copy": "100",
                 "speedup_vs_reference": ""})
    times = {}
    for impl, (_, _, accumulate, _) in impls.items():
        acc = torch.rand(shape[1], device=dev)
        expect = acc.clone()
        reference.channel_sqnorm_accumulate_reference_(expect, x)
        accumulate(acc, x)
        if not _close(f"channel_sqnorm_accumulate_ {impl}", acc, expect, (shape[0] + 2) * 2.0**-23):
            continue
        times[impl] = bench(lambda: accumulate(acc, x))
    summary = []
    for impl, ms in times.items():
        gbs = record("channel_sqnorm_accumulate_", name, shape, x.dtype, impl, ms, nbytes, copy_gbs, times["reference"])
        if impl != "reference":
            verdict = "meets" if gbs >= CHANNEL_STATS_TARGET * copy_gbs else "MISSES"
            summary.append(f"channel_sqnorm_accumulate_ {impl}: {gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy "
                           f"({copy_gbs:.0f} GB/s); {verdict} the {100 * CHANNEL_STATS_TARGET:.0f}% target")

    # --- channel_stats_accumulate_ (sum x^2 and sum |x|, one read) on the same activation --------------
    times = {}
    for impl, (_, _, _, accumulate) in impls.items():
        sq, ab = torch.rand(shape[1], device=dev), torch.rand(shape[1], device=dev)
        expect_sq, expect_ab = sq.clone(), ab.clone()
        reference.channel_stats_accumulate_reference_(expect_sq, expect_ab, x)
        accumulate(sq, ab, x)
        if not (_close(f"channel_stats_accumulate_ {impl} sum x^2", sq, expect_sq, (shape[0] + 2) * 2.0**-23)
                and _close(f"channel_stats_accumulate_ {impl} sum |x|", ab, expect_ab, (shape[0] + 2) * 2.0**-23)):
            continue
        times[impl] = bench(lambda: accumulate(sq, ab, x))
    for impl, ms in times.items():
        gbs = record("channel_stats_accumulate_", name, shape, x.dtype, impl, ms, nbytes, copy_gbs, times["reference"])
        if impl != "reference":
            verdict = "meets" if gbs >= CHANNEL_STATS_TARGET * copy_gbs else "MISSES"
            faster = "faster" if ms < times["reference"] else "NOT faster"
            summary.append(f"channel_stats_accumulate_ {impl}: {gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy "
                           f"({copy_gbs:.0f} GB/s); {verdict} the {100 * CHANNEL_STATS_TARGET:.0f}% target; "
                           f"{times['reference'] / ms:.2f}x the plain-PyTorch reference ({faster})")
    del x, y

    # --- wanda_score and nm_mask on a Llama-2-7B weight ------------------------------------------------
    name = "llama2-7b.mlp.down_proj"
    shape = shapes[name]
    weight = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
    sq_norm = torch.rand(shape[1], device=dev) * 1000
    times = {}
    for impl, (_, wanda_score, _, _) in impls.items():
        if not _close(f"wanda_score {impl}", wanda_score(weight, sq_norm),
                      reference.wanda_score_reference(weight, sq_norm), 2.0**-21):
            continue
        times[impl] = bench(lambda: wanda_score(weight, sq_norm))
    nbytes = weight.numel() * (weight.element_size() + 4) + sq_norm.numel() * 4
    for impl, ms in times.items():
        record("wanda_score", name, shape, weight.dtype, impl, ms, nbytes, copy_gbs, times["reference"])

    for dtype in (torch.float32, torch.bfloat16):  # a wanda score (float32), or a weight's magnitude
        score = torch.randn(*shape, device=dev, dtype=dtype)
        for n, m in ((2, 4), (4, 8)):
            times = {}
            expect = reference.nm_mask_reference(score, n, m)
            for impl, (nm_mask, _, _, _) in impls.items():
                if not torch.equal(nm_mask(score, n, m), expect):
                    print(f"WRONG RESULT: nm_mask {impl} {n}:{m} {dtype} differs from the reference; not timed")
                    FAILURES.append(f"nm_mask {impl} {n}:{m} {dtype}")
                    continue
                times[impl] = bench(lambda: nm_mask(score, n, m))
            nbytes = score.numel() * (score.element_size() + 1)
            for impl, ms in times.items():
                record(f"nm_mask {n}:{m}", name, shape, dtype, impl, ms, nbytes, copy_gbs, times["reference"])

    # --- write ---------------------------------------------------------------------------------------
    header = [
        f"device: {device_name(dev)}" + (f", driver {_driver_version()}" if gpu else ""),
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        (f"timing: triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms; " if gpu else
         "timing: wall-clock median of 3 calls on small shapes, a check of the script, not a speed figure; ")
        + "GB/s counts bytes read + written once; copy_ is a copy of the activation on the same device "
        "(read + write).",
    ]
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench_ops_gpu.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    md = ["# sparsekit ops on GPU", ""] + [f"- {line}" for line in header] + [""]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    md += [""] + [f"- {line}" for line in summary] + [""]
    if FAILURES:
        md += ["## WRONG RESULTS (not timed)", ""] + [f"- {w}" for w in FAILURES] + [""]
    md_path = os.path.join(args.out, "bench_ops_gpu.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {csv_path} and {md_path}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
