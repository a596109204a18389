"""Edge cases of the CUDA sparse linear kernels, to run under compute-sanitizer on a GPU machine.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu_memcheck_cases.py

A read-only review of the never-run CUDA code (2026-11-24) asked for these: the ``nm_linear`` split-K path
(few output features, a long input), ``bitmap_linear`` with in_features not a multiple of 64, every row count
class of the streamed kernels, and the empty / zero-width cases. Each output is also compared with the
plain-PyTorch reference, so a run without the sanitizer still checks results. Small shapes keep the run short
under memcheck. Prints one line per case and "ok" at the end; exits 1 on a mismatch. run_gpu_session.sh calls it.
"""

from __future__ import annotations

import sys

import torch

import sparsekit  # noqa: F401  (registers the ops)
from sparsekit import ops
from sparsekit.formats import nm_index_codes, pack_bitmap, pack_nm, unpack_bitmap, unpack_nm


def check(name: str, got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias) -> bool:
    want = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    scale = x.float().abs() @ w.float().abs().T + (0 if bias is None else bias.float().abs())
    err = ((got.float() - want).abs() / (2.0**-7 * want.abs() + 1e-3 * scale + 1e-6)).max().item() if got.numel() else 0.0
    ok = got.shape == want.shape and got.dtype == x.dtype and err <= 1.0
    print(f"{'ok  ' if ok else 'FAIL'} {name}: shape {tuple(got.shape)}, error {err:.2f}x the bound", flush=True)
    return ok


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script itself")
    dev = parser.parse_args().device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu runs the same cases on the CPU kernels)")
        return 0
    torch.manual_seed(0)
    good = True
    for dtype in (torch.bfloat16, torch.float16):
        for (n, m), out_f, in_f in (((2, 4), 16, 8192), ((2, 4), 40, 4096), ((4, 8), 24, 2048), ((1, 2), 8, 1024),
                                    ((2, 4), 33, 100)):
            w = torch.randn(out_f, in_f, device=dev)
            w = (w * ops.nm_mask(w.abs(), n, m)).to(dtype)
            p = pack_nm(w, n, m)
            codes = nm_index_codes(p.indices, m)
            for rows in (1, 3, 8, 16, 64, 65):
                x = torch.randn(rows, in_f, device=dev).to(dtype)
                b = torch.randn(out_f, device=dev).to(dtype)
                got = ops.nm_linear(x, p.values, codes, n, m, in_f, b)
                good &= check(f"nm_linear {n}:{m} {out_f}x{in_f} rows={rows} {dtype}", got, x, unpack_nm(p), b)
        for out_f, in_f, sparsity in ((16, 4160, 0.5), (24, 700, 0.7), (9, 4095, 0.8), (40, 63, 0.5)):
            w = torch.randn(out_f, in_f, device=dev)
            w[torch.rand(out_f, in_f, device=dev) < sparsity] = 0
            pb = pack_bitmap(w.to(dtype))
            for rows in (1, 3, 8, 16, 64, 65):
                x = torch.randn(rows, in_f, device=dev).to(dtype)
                got = ops.bitmap_linear(x, pb.bitmask, pb.values, pb.row_offsets, in_f, None)
                good &= check(f"bitmap_linear {out_f}x{in_f} {sparsity:.0%} rows={rows} {dtype}", got, x,
                              unpack_bitmap(pb), None)
        # bits set past in_features in the last tile (the reference ignores them; the last row's would read
        # past nnz if a kernel took a value for them)
        w = torch.randn(12, 100, device=dev)
        w[torch.rand(12, 100, device=dev) < 0.5] = 0
        pb = pack_bitmap(w.to(dtype))
        stray = pb.bitmask.clone()
        stray[:, -1] |= 1 << 40
        for rows in (1, 8, 65):
            x = torch.randn(rows, 100, device=dev).to(dtype)
            got = ops.bitmap_linear(x, stray, pb.values, pb.row_offsets, 100, None)
            good &= check(f"bitmap_linear stray bits past in_features rows={rows} {dtype}", got, x,
                          unpack_bitmap(pb), None)
    # zero-width and empty inputs
    b = torch.randn(5, device=dev).bfloat16()
    x0 = torch.randn(2, 3, 0, device=dev).bfloat16()
    z = torch.zeros(5, 0, device=dev).bfloat16()
    got = ops.nm_linear(x0, z, torch.zeros(5, 0, device=dev, dtype=torch.uint8), 2, 4, 0, b)
    good &= bool(torch.equal(got, b.expand(2, 3, 5)))
    acc = torch.zeros(0, device=dev)
    ops.channel_stats_accumulate_(acc, acc.clone(), torch.randn(3, 0, device=dev).bfloat16())
    if dev == "cuda":
        torch.cuda.synchronize()
    print("ok" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
