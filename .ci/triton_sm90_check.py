"""Compile every Triton kernel of sparsekit for an H100 (sm_90) without a GPU, and fail on errors or spills.

The test suite runs the kernels under TRITON_INTERPRET=1, which accepts things a GPU compile rejects (a tl.dot
under 16 along a dimension, block shapes the backend cannot lay out) and says nothing about registers. This
script compiles each kernel ahead of time with the installed Triton for target cuda:90 (no driver needed), then
runs the ptxas shipped with Triton (-v) on the PTX and reads its register and spill report.

The configurations are the ones a GPU run launches: block sizes come from the same functions the dispatch
uses (sparsekit.kernels.triton.dispatch.*_blocks), for each dtype the op takes, on the row counts and widths
of real layers (Llama-3-8B, SmolLM2).

Exit status 1 if a kernel fails to compile or ptxas reports spill stores + loads above --max-spill-bytes
(default 16: a register or two, kept in L1, as bf16 2:4 at 17-32 rows with split-K spills; the configurations
this check made the dispatch change spilled 0.3-40 KB); 0 otherwise, or when Triton's NVIDIA backend or its ptxas is missing (prints why). Usage:
    .venv/bin/python .ci/triton_sm90_check.py [--verbose] [--max-spill-bytes N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="print every configuration, not only failures")
    ap.add_argument("--max-spill-bytes", type=int, default=16, help="spill stores + loads allowed per kernel")
    args = ap.parse_args()

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:  # pragma: no cover - depends on the install
        print(f"triton_sm90_check: skipped, Triton's AOT compiler is not importable ({e})")
        return 0
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        print(f"triton_sm90_check: skipped, no ptxas at {ptxas}")
        return 0

    from sparsekit.kernels.triton import dispatch
    from sparsekit.kernels.triton.channel_stats import channel_stats_kernel
    from sparsekit.kernels.triton.masks import nm_mask_kernel
    from sparsekit.kernels.triton.sparse_gemv import _block_m, bitmap_linear_kernel, nm_linear_kernel
    from sparsekit.kernels.triton.wanda import wanda_score_kernel

    target = GPUTarget("cuda", 90, 32)
    failures: list[str] = []
    count = 0
    start = time.perf_counter()

    def compile_one(label, fn, types, constexprs, num_warps, aligned=()):
        """types: the runtime arguments' Triton types; aligned: arguments Triton may assume divisible by 16
        (pointers from the caching allocator, and sizes that are multiples of 16 on real layers)."""
        nonlocal count
        count += 1
        signature = {a: ("constexpr" if a in constexprs else types[a]) for a in fn.arg_names}
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                                    options={"num_warps": num_warps})
        except Exception as e:
            failures.append(f"{label}: does not compile: {type(e).__name__}: {str(e).strip()[:800]}")
            print(f"FAIL {label}: compile error", flush=True)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            r = subprocess.run([str(ptxas), "--gpu-name", "sm_90a", "-v", str(ptx), "-o", os.devnull],
                               capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{label}: ptxas failed: {r.stderr.strip()[:800]}")
            print(f"FAIL {label}: ptxas error", flush=True)
            return
        spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr))
        regs = re.findall(r"Used (\d+) registers", r.stderr)
        line = f"{label}: {regs[-1] if regs else '?'} registers, {spill} bytes spilled, " \
               f"{kernel.metadata.shared} bytes shared"
        if spill > args.max_spill_bytes:
            failures.append(line)
            print(f"FAIL {line}", flush=True)
        elif args.verbose:
            print(f"ok   {line}", flush=True)

    # Real layers: (out_features, in_features).
    llama_q, llama_up, smol_up = (4096, 4096), (14336, 4096), (1536, 576)
    float_types = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

    # --- nm_linear: 2:4, 4:8 and 8:16 (and an odd 1:3), decode batches of 1, 16, 17 and 64 rows.
    for dname, dt in float_types.items():
        for n, m in [(2, 4), (4, 8), (8, 16), (1, 3)]:
            for rows in (1, 16, 17, 64):
                if dt == "fp32" and rows not in (1, 64):
                    continue
                out_f, in_f = llama_up
                groups = in_f // m if in_f % m == 0 else (in_f - in_f % m) // m
                block_n, block_g, warps = dispatch.nm_linear_blocks(rows, m, groups, True, 4 if dt == "fp32" else 2)
                m_p2, kept = triton.next_power_of_2(m), m - n
                for atomic in (False, True):
                    compile_one(
                        f"nm_linear {dname} {n}:{m} rows={rows} BLOCK_N={block_n} BLOCK_G={block_g} atomic={atomic}",
                        nm_linear_kernel,
                        dict(x_ptr=f"*{dt}", values_ptr=f"*{dt}", codes_ptr="*u8", bias_ptr=f"*{dt}",
                             out_ptr="*fp32" if atomic else f"*{dt}", rows="i32", out_features="i32",
                             num_groups="i32", kept_per_row="i32", code_width="i32", stride_xm="i32",
                             groups_per_split="i32"),
                        dict(M=m, K=kept, K_P2=triton.next_power_of_2(kept), M_P2=m_p2, BITS=2 if m <= 4 else 4,
                             BLOCK_M=_block_m(rows), BLOCK_N=block_n, BLOCK_G=block_g, HAS_BIAS=True,
                             ATOMIC=atomic, UPCAST=dt == "fp32"),
                        warps, aligned=("x_ptr", "values_ptr", "codes_ptr", "bias_ptr", "out_ptr", "out_features"))

    # --- bitmap_linear
    for dname, dt in float_types.items():
        for rows in (1, 16, 64):
            for out_f, in_f in (llama_q, smol_up):
                block_n, block_t, warps = dispatch.bitmap_linear_blocks(-(-in_f // 64), True, 4 if dt == "fp32" else 2)
                compile_one(
                    f"bitmap_linear {dname} rows={rows} {out_f}x{in_f} BLOCK_N={block_n} BLOCK_T={block_t}",
                    bitmap_linear_kernel,
                    dict(x_ptr=f"*{dt}", bitmask_ptr="*i64", values_ptr=f"*{dt}", row_offsets_ptr="*i64",
                         bias_ptr=f"*{dt}", out_ptr=f"*{dt}", rows="i32", out_features="i32", in_features="i32",
                         num_tiles="i32", nnz="i32", stride_xm="i32"),
                    dict(BLOCK_M=_block_m(rows), BLOCK_N=block_n, BLOCK_T=block_t, HAS_BIAS=True,
                         UPCAST=dt == "fp32"),
                    warps, aligned=("x_ptr", "bitmask_ptr", "row_offsets_ptr", "bias_ptr", "out_ptr"))

    # --- nm_mask (scores of any float dtype), wanda_score, channel statistics
    for dname, dt in {**float_types, "float64": "fp64"}.items():
        for n, m in [(2, 4), (4, 8), (8, 16), (1, 3)]:
            block_r, block_g, warps = dispatch.nm_mask_blocks(m, 4096 // m, on_gpu=True)
            compile_one(f"nm_mask {dname} {n}:{m} BLOCK_R={block_r} BLOCK_G={block_g}", nm_mask_kernel,
                        dict(score_ptr=f"*{dt}", keep_ptr="*u8", rows="i32", num_groups="i32", stride_r="i32",
                             stride_c="i32", n="i32"),
                        dict(M=m, M_P2=triton.next_power_of_2(m), BLOCK_R=block_r, BLOCK_G=block_g), warps,
                        aligned=("score_ptr", "keep_ptr"))
        block_r, block_c, warps = dispatch.wanda_blocks(4096, on_gpu=True)
        compile_one(f"wanda_score {dname} BLOCK_R={block_r} BLOCK_C={block_c}", wanda_score_kernel,
                    dict(weight_ptr=f"*{dt}", sq_norm_ptr="*fp32", out_ptr="*fp32", rows="i32", cols="i32",
                         stride_r="i32", stride_c="i32"),
                    dict(BLOCK_R=block_r, BLOCK_C=block_c), warps, aligned=("weight_ptr", "sq_norm_ptr", "out_ptr"))
    for dname, dt in float_types.items():
        size = 4 if dt == "fp32" else 2
        for channels in (4096, 576, 100):
            block_t, block_c, warps = dispatch.channel_stats_blocks(channels, size, on_gpu=True)
            for with_abs in (False, True):
                compile_one(f"channel_stats {dname} C={channels} abs={with_abs} BLOCK_T={block_t} BLOCK_C={block_c}",
                            channel_stats_kernel,
                            dict(x_ptr=f"*{dt}", sq_ptr="*fp32", abs_ptr="*fp32", T="i32", C="i32",
                                 stride_t="i32", iters="i32"),
                            dict(WITH_ABS=with_abs, BLOCK_T=block_t, BLOCK_C=block_c), warps,
                            aligned=("x_ptr", "sq_ptr", "abs_ptr"))

    took = time.perf_counter() - start
    print(f"triton_sm90_check: {count} kernel configurations compiled for sm_90 with triton {triton.__version__} "
          f"in {took:.0f} s, {len(failures)} failed")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
