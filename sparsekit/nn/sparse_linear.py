"""SparseLinear: a drop-in ``nn.Linear`` whose pruned weight is stored packed, and whose forward takes the
fastest measured path for each call.

Storage (persistent buffers, so ``state_dict`` / ``save_compressed`` hold only the packed form):

* ``"N:M"`` (``"2:4"``, ``"4:8"``, ...; N zeros in every M consecutive inputs, ``sparsekit.formats.sparse24``):
  ``values`` (out, in / M * (M - N)) and ``index_codes`` uint8 (2-bit codes for M <= 4, 4-bit for M <= 16).
* ``"bitmap"`` (any sparsity, ``sparsekit.formats.bitmap``): ``bitmask`` int64 (out, ceil(in / 64)),
  ``values`` (nnz,) and ``row_offsets`` int64 (out + 1,).
* ``bias`` (out,) as a frozen parameter, as ``nn.Linear`` names it.

Forward paths, chosen per call from the device, the dtype and M = the number of rows of x (the product of
its leading dims); ``SparseLinear.path(rows, device, dtype)`` says which one a call takes:

* ``"sparse"``: ``sparsekit.ops.nm_linear`` / ``bitmap_linear`` where the packed kernel was measured to beat
  dense ``F.linear`` (``CPU_SPARSE_MAX_ROWS`` below, from ``benchmarks/results/sparse_linear_cpu_dispatch_2t.md``:
  cold weights, 2 threads, quiet machine; ``CPU_SPARSE_MAX_ROWS_ONE_THREAD`` from the 1-thread run, the same
  limits): 2:4, 4:8 and bitmap (>= 50% sparse) in bfloat16 for M <= 64 and in float32 at any M
  (``prefill_cpu_{2t,1t}.md``: the float32 ops stream up to 24 rows and above multiply decoded weight blocks
  with sparsekit's AVX-512 GEMM, ``csrc/cpu/sgemm.h``, about twice the rate of torch's float32 F.linear, MKL's
  AVX2 sgemm, on the development machine's AMD CPU; with ``SPARSEKIT_CPU_PANEL=0`` they use MKL there and the
  float32 limit is 2048, 256 for layers of at most 2^20 weights with two or more threads); 1:2 and 8:16 the same
  (``benchmarks/results/nm_patterns_cpu_*.md``: they run like 2:4 and 4:8). In bfloat16 the ops run their
  streamed kernels up to 12 (2:4, 4:8) / 24 (bitmap) rows (8 for weights of at most 2^20 elements) and the panel
  path above (``csrc/cpu/panel_gemm.h``: the weight decoded 24 rows at a time into L2, a ``vdpbf16ps``
  micro-kernel), where the CPU has AVX512-BF16.
  ``CPU_SPARSE_MAX_ROWS_UNPACK`` can raise a limit for layers with ``dense_fallback="unpack"`` (where the
  alternative is decode + GEMM, not dense); it is empty at present.
  Only where the CPU C++ kernels run their AVX-512 path; their portable path (N:M patterns other than the
  half-density ones 1:2, 2:4, 4:8, 8:16; float16; CPUs without AVX-512) is 10-50x slower than dense and is never
  chosen for speed: those layers take the fallback at every M. The bfloat16 limits assume the AVX512-BF16 path
  (``cpu_bf16_dot()``); without it they are capped at M = 4, and with ``SPARSEKIT_CPU_PANEL=0`` (no panel path)
  at M = 16.
* ``"cslt"``: CUDA only, 2:4 in float16/bfloat16 where torch exposes cuSPARSELt
  (``torch._cslt_sparse_mm``, ``torch.backends.cusparselt.is_available()``) and the shape fits its limits
  (out % 16 == 0, in % 16 == 0), unless the layer was built with ``cslt=False`` (or ``set_cslt(False)``),
  which also drops the cuSPARSELt copy of the weight. Untested on a device so far.
* ``"dense"``: ``F.linear`` on a cached dense copy of the weight, when ``dense_fallback="cache"``.
* ``"unpack"``: everywhere else with ``dense_fallback="unpack"`` (the default): ``sparsekit.ops.nm_unpack_linear``
  / ``bitmap_unpack_linear``, i.e. ``F.linear`` on the unpacked weight without keeping it. On CPU, bfloat16
  with AVX512-BF16 up to M = 128 takes the panel path above; otherwise the kernel decodes blocks of 4-32 MiB
  of dense weight into a per-thread scratch buffer (reused from call to call) and runs one GEMM per block
  (``csrc/cpu/unpack_linear.h``: sparsekit's AVX-512 GEMM for float32, BLAS otherwise). On other devices:
  decode, then ``F.linear``.
* ``"grad"``: when x requires grad: ``F.linear`` on the unpacked weight (``sparsekit.ops.nm_unpack``), so
  gradients reach x (the ops have no autograd formula). The packed weight itself is frozen.

The dense fallback's storage, a trade-off to choose per model:

* ``dense_fallback="unpack"`` (default) keeps only the packed weight: memory is the packed size (2:4 fp32 0.53x dense,
  bitmap 50% fp32 0.53x), plus one scratch block per thread that runs the kernel (4-32 MiB, kept for the life of the
  thread, shared by all layers). Its calls outside the kernel's region (M above the limits: prefill) cost decode + GEMM.
  bfloat16 up to M = 128 (AVX512-BF16): the panel path, at M = 128 1.01-1.34x dense for 2:4, 1.02-1.35x for 4:8 and
  1.02-1.37x for bitmap with 2 threads, 1.01-1.05x with 1 thread (sparse_linear_cpu_dispatch runs of 2026-11-24
  16:11-16:17). float32 (any M past 24 rows; SparseLinear sends float32 to the op itself, which runs the same):
  decode + sparsekit's GEMM, see CPU_SPARSE_MAX_ROWS. Otherwise decode + BLAS, measured against dense
  ``F.linear`` with cold weights on a quiet machine: float32 with SPARSEKIT_CPU_PANEL=0 0.95-1.17x at M = 64..2048
  with 1 thread and 0.87-1.54x with 2 (the eighth session's ``prefill_cpu_{1t,2t}.md``; 0.94-1.08x on the SmolLM2
  shapes above M = 256 with 2 threads); bfloat16 above M = 128
  0.93-1.01x (development runs, 1 thread, M = 256 and 1024 on 4096x4096 and 576x576: no compute is saved, and the
  decode is not free); before the
  panel path, bfloat16 at M >= 32 ran 2:4 0.81-1.25x and bitmap 0.78-1.27x (``unpack_linear_cpu_{1t,2t}.md``,
  04:39). Layers of N:M patterns other than the half-density ones, or float16, take this path at every M. The
  decode is vectorised for every power-of-two M (2, 4, 8, 16); other M decode their column mask with a scalar loop
  per kept value.
  float16 was not measured. Unpacking the whole weight into a fresh tensor and calling ``F.linear`` is slower: a fresh
  allocation of tens of MiB is page-faulted on every call (0.11-0.97x dense on the Llama shapes in the 04:39 runs).
* ``dense_fallback="cache"`` also keeps a dense copy of the weight in memory (a non-persistent buffer: never
  saved, rebuilt on load): calls outside the measured region cost a dense ``F.linear`` plus ~6 us of Python
  dispatch (0.9-1.0x measured; the dispatch shows on the smallest layers), but memory is packed + dense
  (1.53x dense for 2:4 fp32), more than the dense model.

The limits are decided from ``torch.get_num_threads()`` when a layer is built; ``refresh_dispatch()``
re-decides them.

On CUDA, ``CUDA_SPARSE_MAX_ROWS`` is empty until sparsekit's own GPU kernels for these ops are measured:
calls take the cuSPARSELt path where it applies, else ``unpack`` (decode, then cuBLAS) or the dense cache.

Not done: training (the packed weight has no gradient), a measured CUDA dispatch table, quantized values.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..compressed import register_compressed_module
from ..formats import (BITMAP_TILE, check_bitmap_packed, check_nm_packed, nm_index_bits, nm_index_codes, pack_bitmap,
                       pack_nm)
from ..models import is_linear, linear_weight

__all__ = [
    "SparseLinear",
    "parse_format",
    "auto_format",
    "CPU_SPARSE_MAX_ROWS",
    "CUDA_SPARSE_MAX_ROWS",
    "BITMAP_MIN_SPARSITY",
    "CPU_SPARSE_MAX_ROWS_ONE_THREAD",
    "CPU_F32_ANY_ROWS",
    "CPU_F32_MAX_ROWS_WITHOUT_GEMM",
    "CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT",
    "CPU_SMALL_WEIGHT",
    "CPU_SPARSE_MAX_ROWS_UNPACK",
    "CPU_BF16_MAX_ROWS_WITHOUT_DOT",
    "CPU_BF16_MAX_ROWS_WITHOUT_PANEL",
    "cpu_bf16_dot",
    "cpu_bf16_panel",
    "cpu_f32_gemm",
    "cpu_sparse_kernels_fast",
    "DENSE_FALLBACKS",
]

DENSE_FALLBACKS = ("unpack", "cache")

# Largest M (rows of x) at which the packed CPU op beats dense F.linear, per (format, dtype), with two or more
# torch threads.
# bfloat16, from benchmarks/results/sparse_linear_cpu_dispatch_2t.md (quiet machine, cold weights, 2 threads,
# Llama-3-8B and SmolLM2 shapes, M = 1..128 with 17 and 33; the op's speedups over the six shapes, run of
# 2026-11-24 16:11, after the 4:8 rank decode, the panel's tail rows and bitmap's streamed kernel to 24 rows): at
# M = 64, 2:4 1.14-1.81x, 4:8 1.18-1.79x, bitmap 1.14-1.79x; the weakest cells are M = 24 (the panel path rounds
# x's rows up to 16): 1.03-1.48x; SparseLinear's worst 0.996x. That run's dense baseline was slower than the sixth
# session's (12:09: 2:4 1.05x, bitmap 1.01x, 4:8 0.95x at M = 16-24). At M = 128 (decode + GEMM inside the op)
# about what the dense fallback gives. The ops run their streamed kernels to 12 / 24 rows (8 for weights of at
# most 2^20 elements) and the panel path above (csrc/cpu/panel_gemm.h).
# float32, at any M since the eleventh session (CPU_F32_ANY_ROWS): the ops stream up to 24 rows and above decode
# the weight in blocks and multiply with sparsekit's AVX-512 GEMM (csrc/cpu/sgemm.h), about twice the rate of
# torch's float32 F.linear here (MKL's sgemm runs its AVX2 path on this AMD CPU). benchmarks/results/
# prefill_cpu_2t.md (2026-11-24 22:42, M = 64..4096, six shapes, cold weights): 2:4 1.77-2.62x, 4:8 1.68-2.55x,
# bitmap 1.71-2.66x dense; sparse_linear_cpu_dispatch_f32_2t.md (22:48, M = 1..128): SparseLinear >= 1.60x.
# Without that GEMM (SPARSEKIT_CPU_PANEL=0: decode + MKL) the eighth session's limits hold:
# CPU_F32_MAX_ROWS_WITHOUT_GEMM (the streamed kernels to 2048 rows), and CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT below.
# Re-measure with benchmarks/bench_sparse_linear.py, bench_unpack_linear_cpu.py and bench_nm_patterns_cpu.py before
# changing.
CPU_F32_ANY_ROWS = sys.maxsize
CPU_F32_MAX_ROWS_WITHOUT_GEMM = 2048
CPU_SPARSE_MAX_ROWS: dict[tuple[str, torch.dtype], int] = {
    ("1:2", torch.float32): CPU_F32_ANY_ROWS,
    ("1:2", torch.bfloat16): 64,
    ("2:4", torch.float32): CPU_F32_ANY_ROWS,
    ("2:4", torch.bfloat16): 64,
    ("4:8", torch.float32): CPU_F32_ANY_ROWS,
    ("4:8", torch.bfloat16): 64,
    ("8:16", torch.float32): CPU_F32_ANY_ROWS,
    ("8:16", torch.bfloat16): 64,
    ("bitmap", torch.float32): CPU_F32_ANY_ROWS,
    ("bitmap", torch.bfloat16): 64,
}
# Without sparsekit's float32 GEMM (SPARSEKIT_CPU_PANEL=0), with two or more threads, the float32 limits of layers
# of at most CPU_SMALL_WEIGHT elements (SmolLM2's) are capped at these: M = 256, where the eighth session's runs had
# 576x576 at 1.01-1.04x (N:M) and 1.15-1.18x (bitmap) and 576x1536 at 1.07-1.11x and 1.17-1.20x. Above, such
# layers took decode + BLAS (0.94-1.08x there).
CPU_SMALL_WEIGHT = 1 << 20
CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT: dict[tuple[str, torch.dtype], int] = {
    (fmt, torch.float32): 256 for fmt in ("1:2", "2:4", "4:8", "8:16", "bitmap")
}
# The same with one torch thread, used when torch.get_num_threads() < 2 (no small-weight caps).
# bfloat16 from benchmarks/results/sparse_linear_cpu_dispatch.md (16:17): at M = 64, 2:4 1.10-1.17x, 4:8
# 1.14-1.17x, bitmap 1.04-1.17x. Below 1x, on Llama down: 2:4 at M = 17 (0.91x; 0.87x before the panel's tail rows),
# bitmap at M = 24 (0.96x; 1.05x in the 15:57 run, the results at commit 8920e9c). The fallback there (unpack:
# the same panel path) is no faster. 4:8 read 0.87-0.99x at M = 16-24 before its rank decode (12:15), 1.04-1.41x
# now; 8:16 as 4:8 (nm_patterns_cpu_1t_bf16.md: >= 1.13x at every M).
# float32 from prefill_cpu_1t.md (22:36, M = 64..4096): 2:4 1.91-2.30x, 4:8 1.83-2.24x, bitmap 1.88-2.35x;
# sparse_linear_cpu_dispatch_f32_1t.md (22:45, M = 1..128): SparseLinear >= 1.44x.
CPU_SPARSE_MAX_ROWS_ONE_THREAD: dict[tuple[str, torch.dtype], int] = {
    ("1:2", torch.float32): CPU_F32_ANY_ROWS,
    ("1:2", torch.bfloat16): 64,
    ("2:4", torch.float32): CPU_F32_ANY_ROWS,
    ("2:4", torch.bfloat16): 64,
    ("4:8", torch.float32): CPU_F32_ANY_ROWS,
    ("4:8", torch.bfloat16): 64,
    ("8:16", torch.float32): CPU_F32_ANY_ROWS,
    ("8:16", torch.bfloat16): 64,
    ("bitmap", torch.float32): CPU_F32_ANY_ROWS,
    ("bitmap", torch.bfloat16): 64,
}
# With dense_fallback="unpack" the alternative to the op is decode + GEMM, not dense F.linear, and where both
# lose to dense the op can still be the faster of the two: a larger limit per (format, dtype) for such layers, at
# any thread count. Empty: the op itself runs decode + GEMM above its streamed kernels' rows.
CPU_SPARSE_MAX_ROWS_UNPACK: dict[tuple[str, torch.dtype], int] = {}
# The bfloat16 limits above were measured with the kernels' AVX512-BF16 path (vdpbf16ps, with VBMI2). A CPU
# without it runs their float32-lane path, which was measured only in development runs
# (SPARSEKIT_CPU_ISA=avx512, 1 thread, 4096x4096: 2:4 and bitmap won up to M = 4); bfloat16 limits are capped
# at that there.
CPU_BF16_MAX_ROWS_WITHOUT_DOT = 4
# From 13 (2:4, 4:8) / 25 (bitmap) rows on (9 for weights of at most 2^20 elements), the bfloat16 ops run the
# panel path (csrc/cpu/panel_gemm.h: decode to L2
# + a vdpbf16ps micro-kernel) instead of their streamed kernels, when cpu_bf16_panel(); the bfloat16 limits above
# past M = 16 rest on it. Without it (SPARSEKIT_CPU_PANEL=0) they are capped at this, the streamed kernels' limit.
CPU_BF16_MAX_ROWS_WITHOUT_PANEL = 16
# The same for sparsekit's CUDA / Triton kernels of nm_linear and bitmap_linear: empty until they are measured
# on a device (benchmarks/bench_sparse_linear.py --device cuda); fill it from that run.
CUDA_SPARSE_MAX_ROWS: dict[tuple[str, torch.dtype], int] = {}
# The bitmap tables were measured at 50%, 70% and 80% sparsity; below 50% the kernel is not used.
BITMAP_MIN_SPARSITY = 0.5

# cuSPARSELt shape limits for float16/bfloat16, as torch.sparse's cuSPARSELt backend states them: the sparse
# operand's rows and columns multiples of 16, the dense operand's of 8 (x's rows are padded to that).
_CSLT_OUT_MULTIPLE, _CSLT_IN_MULTIPLE, _CSLT_ROWS_MULTIPLE = 16, 16, 8
_CSLT_DTYPES = (torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda")  # torch.autocast: compute in its dtype there


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None when it cannot be read); read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def cpu_sparse_kernels_fast() -> tuple[bool, str]:
    """(True, why) when the CPU C++ sparse kernels run their AVX-512 path here; (False, why) otherwise.

    Decided once per process (when the first SparseLinear is built): the C++ backend must be
    loaded, the CPU must have AVX-512 F/BW/VL (as csrc/cpu/cpu_isa.h checks), and SPARSEKIT_CPU_ISA must
    not be "scalar".
    """
    from .._backends import status

    cpu = status().get("cpu")
    if cpu is None or not cpu.live:
        return False, f"CPU C++ backend not live ({cpu.detail if cpu else 'not loaded'})"
    if os.environ.get("SPARSEKIT_CPU_ISA", "") == "scalar":
        return False, "SPARSEKIT_CPU_ISA=scalar forces the portable kernels"
    flags = _cpu_flags()
    if flags is None:
        return False, "cannot read /proc/cpuinfo to check for AVX-512"
    missing = [flag for flag in ("avx512f", "avx512bw", "avx512vl") if flag not in flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}: the kernels' portable path is slower than dense"
    return True, "CPU C++ kernels with AVX-512"


@functools.lru_cache(maxsize=None)
def cpu_bf16_dot() -> bool:
    """True when the CPU kernels' bfloat16 paths use vdpbf16ps here (AVX512-BF16 and VBMI2, as
    csrc/cpu/cpu_isa.h checks, and SPARSEKIT_CPU_ISA not "avx512" or "scalar"). Decided once per process."""
    if not cpu_sparse_kernels_fast()[0] or os.environ.get("SPARSEKIT_CPU_ISA", "") in ("avx512", "scalar"):
        return False
    flags = _cpu_flags()
    return flags is not None and "avx512_bf16" in flags and "avx512_vbmi2" in flags


def _cpu_panel_switch_on() -> bool:
    """SPARSEKIT_CPU_PANEL is not "0": the switch that csrc/cpu/panel_gemm.h's panel_enabled() reads on every
    call, for the bfloat16 panel path and the float32 GEMM alike."""
    return os.environ.get("SPARSEKIT_CPU_PANEL", "") != "0"


def cpu_bf16_panel() -> bool:
    """True when the bfloat16 CPU ops take the panel path for many rows: cpu_bf16_dot() and SPARSEKIT_CPU_PANEL
    is not "0"."""
    return cpu_bf16_dot() and _cpu_panel_switch_on()


def cpu_f32_gemm() -> bool:
    """True when the float32 CPU ops multiply decoded weight blocks with sparsekit's AVX-512 GEMM
    (csrc/cpu/sgemm.h): the CPU kernels' AVX-512 path runs (cpu_sparse_kernels_fast()) and SPARSEKIT_CPU_PANEL
    is not "0"."""
    return cpu_sparse_kernels_fast()[0] and _cpu_panel_switch_on()


def parse_format(fmt: str) -> tuple[str, int | None, int | None]:
    """'2:4' -> ('nm', 2, 4); 'bitmap' -> ('bitmap', None, None). Raises ValueError naming the problem.

    N:M means N zeros in every M consecutive input weights (sparsekit's convention), 0 <= N < M <= 16.
    """
    if fmt == "bitmap":
        return "bitmap", None, None
    parts = str(fmt).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"format must be 'auto', 'bitmap' or 'N:M' (e.g. '2:4', '4:8'), got {fmt!r}")
    n, m = int(parts[0]), int(parts[1])
    if not (1 <= m <= 16 and 0 <= n < m):
        raise ValueError(f"N:M format needs 0 <= N < M <= 16, got {fmt!r}")
    return "nm", n, m


def _packed_bytes(kind: str, out_f: int, in_f: int, elem: int, n: int = 0, m: int = 1, nnz: int = 0) -> int:
    if kind == "nm":
        kept = in_f // m * (m - n)
        return out_f * kept * elem + out_f * (-(-kept * nm_index_bits(m) // 8))
    tiles = -(-in_f // BITMAP_TILE)
    return nnz * elem + out_f * tiles * 8 + (out_f + 1) * 8


def _fits_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= m - n).all())


def auto_format(weight: torch.Tensor) -> str | None:
    """The format ``format="auto"`` picks for W (out, in): the smaller of 2:4 (when every group of 4 holds at
    most 2 non-zeros) and bitmap, 2:4 on a tie; None when neither is smaller than the dense weight."""
    out_f, in_f = weight.shape
    if weight.numel() == 0:
        raise ValueError(f"weight {out_f}x{in_f} has no elements: there is nothing to pack")
    elem = weight.element_size()
    dense = out_f * in_f * elem
    nnz = int((weight != 0).sum())
    candidates = []
    if _fits_nm(weight, 2, 4):
        candidates.append((_packed_bytes("nm", out_f, in_f, elem, 2, 4), 0, "2:4"))
    candidates.append((_packed_bytes("bitmap", out_f, in_f, elem, nnz=nnz), 1, "bitmap"))
    best = min(candidates)
    return best[2] if best[0] < dense else None


@register_compressed_module
class SparseLinear(nn.Module):
    """``nn.Linear`` with a packed sparse weight. Same forward contract: x (..., in_features) in the layer's
    dtype and device -> (..., out_features); a wrong last dim, dtype or device raises ValueError.

    Build with ``SparseLinear.from_linear(linear, format=...)``; the constructor makes an empty layer of the
    right shapes (``nnz`` = number of stored values, bitmap only).
    """

    # Packed buffers loaded by load_state_dict calls that each brought only some of them (strict=False, shard by
    # shard); checked, and the layer usable, once all have come. Class defaults: a layer pickled before these
    # existed has none pending.
    _pending_load: frozenset = frozenset()
    _incomplete: bool = False

    def __init__(self, in_features: int, out_features: int, format: str = "2:4", bias: bool = True,
                 nnz: int | None = None, dense_fallback: str = "unpack", device=None, dtype=None,
                 cslt: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if dense_fallback not in DENSE_FALLBACKS:
            raise ValueError(f"dense_fallback must be one of {DENSE_FALLBACKS}, got {dense_fallback!r}")
        kind, n, m = parse_format(format)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"SparseLinear holds float32, bfloat16 or float16 values, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.format, self.kind, self.n, self.m = format, kind, n, m
        self.dense_fallback = dense_fallback
        self.use_cslt = bool(cslt)  # may keep a cuSPARSELt copy on CUDA (the "cslt" path)
        kw = {"device": device}
        if kind == "nm":
            if in_features % m:
                raise ValueError(f"N:M format {format}: M={m} does not divide in_features={in_features}")
            kept = in_features // m * (m - n)
            self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype, **kw))
            # positions 0 .. K - 1 in every group: an empty layer is a valid packed weight (of zeros). Built on
            # the CPU (nm_index_codes reads values: not possible under `with torch.device("meta")`), then moved.
            row = nm_index_codes(torch.arange(m - n, dtype=torch.uint8, device="cpu").repeat(1, in_features // m), m)
            self.register_buffer("index_codes", row.to(self.values.device).repeat(out_features, 1))
            self.nnz = out_features * kept
        else:
            if nnz is None or not (0 <= nnz <= in_features * out_features):
                raise ValueError(f"bitmap format needs nnz in [0, {in_features * out_features}], got {nnz}")
            tiles = -(-in_features // BITMAP_TILE)
            self.register_buffer("bitmask", torch.zeros(out_features, tiles, dtype=torch.int64, **kw))
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype, **kw))
            self.register_buffer("row_offsets", torch.zeros(out_features + 1, dtype=torch.int64, **kw))
            self.nnz = nnz
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias \
            else None
        # Derived tensors, never saved: rebuilt from the packed buffers after loading.
        self.register_buffer("dense_weight", None, persistent=False)
        self.register_buffer("cslt_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        # decided once, outside forward (torch.compile sees a constant): {dtype: largest M for the CPU kernel}
        self._cpu_sparse_max_rows = self._cpu_sparse_limits()
        self._cuda_sparse_max_rows = self._cuda_sparse_limits()
        if dense_fallback == "cache":  # right shape now; filled from the packed buffers once they are loaded
            self.dense_weight = torch.zeros(out_features, in_features, dtype=dtype, **kw)

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, format: str = "auto", dense_fallback: str = "unpack",
                    cslt: bool = True) -> "SparseLinear":
        """Pack the already-pruned weight of ``linear`` (``nn.Linear`` or transformers' ``Conv1D``).

        format: ``"2:4"``, ``"4:8"``, any ``"N:M"``, ``"bitmap"``, or ``"auto"`` (``auto_format``: 2:4 when
        the weight fits it, else bitmap, whichever is smaller; raises if neither is smaller than dense).
        An N:M format raises the formats' ValueError naming the first group that breaks the pattern.
        The weight is not pruned here: prune first (``sparsekit.prune``).
        cslt: allow the cuSPARSELt path on CUDA (2:4 float16/bfloat16); False keeps no cuSPARSELt copy.
        """
        if not is_linear(linear):
            raise TypeError(f"expected nn.Linear (or transformers Conv1D), got {type(linear).__name__}")
        weight = linear_weight(linear)
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"SparseLinear packs float32, bfloat16 or float16 weights, got {weight.dtype}")
        out_f, in_f = weight.shape
        if format == "auto":
            chosen = auto_format(weight)
            if chosen is None:
                sparsity = float((weight == 0).sum()) / weight.numel()
                raise ValueError(f"weight {out_f}x{in_f} is only {sparsity:.1%} zeros: no packed format is smaller "
                                 "than dense; prune it first or keep it dense")
            format = chosen
        kind, n, m = parse_format(format)
        bias = getattr(linear, "bias", None)
        if kind == "nm":
            packed = pack_nm(weight, n, m)
            layer = cls(in_f, out_f, format, bias=bias is not None, dense_fallback=dense_fallback,
                        device=weight.device, dtype=weight.dtype, cslt=cslt)
            layer.values.copy_(packed.values)
            layer.index_codes.copy_(nm_index_codes(packed.indices, m))
        else:
            packed = pack_bitmap(weight)
            layer = cls(in_f, out_f, format, bias=bias is not None, nnz=packed.values.numel(),
                        dense_fallback=dense_fallback, device=weight.device, dtype=weight.dtype, cslt=cslt)
            layer.bitmask.copy_(packed.bitmask)
            layer.values.copy_(packed.values)
            layer.row_offsets.copy_(packed.row_offsets)
        if bias is not None:
            layer.bias.copy_(bias)
        layer._refresh_derived()
        return layer

    # save_compressed / load_compressed (sparsekit.compressed)
    def compressed_spec(self) -> dict:
        spec = {"in_features": self.in_features, "out_features": self.out_features, "format": self.format,
                "bias": self.bias is not None, "dense_fallback": self.dense_fallback,
                "cslt": getattr(self, "use_cslt", True)}
        if self.kind == "bitmap":
            spec["nnz"] = self.nnz
        return spec

    @classmethod
    def from_compressed_spec(cls, spec: dict, dtype: torch.dtype, device) -> "SparseLinear":
        return cls(spec["in_features"], spec["out_features"], spec["format"], bias=spec["bias"],
                   nnz=spec.get("nnz"), dense_fallback=spec.get("dense_fallback", "unpack"), device=device,
                   dtype=dtype, cslt=spec.get("cslt", True))

    # ------------------------------------------------------------------------------------------------
    # Derived tensors
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight, in the values' dtype and device (``sparsekit.ops.nm_unpack`` /
        ``bitmap_unpack``: the C++ kernel on CPU, the plain-PyTorch reference elsewhere)."""
        if self.kind == "nm":
            return torch.ops.sparsekit.nm_unpack(self.values, self.index_codes, self.n, self.m, self.in_features)
        return torch.ops.sparsekit.bitmap_unpack(self.bitmask, self.values, self.row_offsets, self.in_features)

    def set_dense_fallback(self, mode: str) -> "SparseLinear":
        """Switch between ``"unpack"`` (packed weight only) and ``"cache"`` (plus a dense copy in memory)."""
        if mode not in DENSE_FALLBACKS:
            raise ValueError(f"dense_fallback must be one of {DENSE_FALLBACKS}, got {mode!r}")
        self.dense_fallback = mode
        self._refresh_dense()
        return self.refresh_dispatch()  # the kernel limits depend on the fallback (CPU_SPARSE_MAX_ROWS_UNPACK)

    def set_cslt(self, enabled: bool) -> "SparseLinear":
        """Allow (True) or forbid (False) the cuSPARSELt path; False drops the cuSPARSELt copy of the weight."""
        self.use_cslt = bool(enabled)
        self._refresh_cslt()
        return self

    def refresh_derived(self) -> "SparseLinear":
        """Rebuild the copies derived from the packed buffers (the dense cache of ``dense_fallback="cache"``, the
        cuSPARSELt copy). Loading, ``.to()`` and the setters do it; call it after editing ``values`` (or the
        other packed buffers) in place, or calls on the dense / cuSPARSELt paths keep the old weight."""
        self._refresh_derived()
        return self

    def _refresh_derived(self) -> None:
        self._refresh_dense()
        self._refresh_cslt()

    @torch.no_grad()
    def _refresh_dense(self) -> None:
        self.dense_weight = self.to_dense() if self.dense_fallback == "cache" else None

    @torch.no_grad()
    def _refresh_cslt(self) -> None:
        """The cuSPARSELt copy of the weight where the "cslt" path applies (values' device and dtype), else None."""
        self.cslt_weight = None
        if self._cslt_possible(self.values.device, self.values.dtype):
            self.cslt_weight = torch._cslt_compress(self.to_dense())

    def _apply(self, fn, recurse=True):
        # What fn makes of values' dtype, found on an empty tensor before anything is converted: a refused
        # conversion (layer.double()) leaves the layer as it was.
        target = fn(torch.empty(0, dtype=self.values.dtype, device=self.values.device)).dtype
        if target not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"SparseLinear holds float32, bfloat16 or float16 values; a conversion would make them "
                             f"{target} (the packed kernels have no {target} path). This layer is unchanged; in a "
                             "model, the modules converted before it were not restored: convert the model back "
                             "(e.g. model.float())")
        def keep_integers(t: torch.Tensor) -> torch.Tensor:
            # Module.type(dtype) converts every tensor; the packed codes, bitmask and row offsets must keep their
            # integer dtype (float16 row offsets would lose bits), so they only follow a device move.
            out = fn(t)
            if not t.is_floating_point() and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        super()._apply(keep_integers, recurse)
        self._refresh_cslt()  # the cuSPARSELt copy is device-specific: rebuild it for the new device / dtype
        return self

    def _packed_names(self) -> tuple[str, ...]:
        return ("values", "index_codes") if self.kind == "nm" else ("bitmask", "values", "row_offsets")

    def _check_packed(self, tensors: dict, how: str) -> None:
        """Raise ValueError unless ``tensors`` (the packed buffers by name) make a valid weight of this layer."""
        what = f"SparseLinear({self.in_features} -> {self.out_features}, {self.format}) {how}"
        if self.kind == "nm":
            check_nm_packed(tensors["values"], tensors["index_codes"], self.n, self.m, self.in_features, what=what)
            return
        values = tensors["values"]
        if values.shape != self.values.shape:
            raise ValueError(f"{what}: the checkpoint holds {values.numel()} values, this layer was built for "
                             f"nnz={self.values.numel()}; build it with SparseLinear(..., nnz={values.numel()}) "
                             f"(sparsekit.load_compressed does) or load the checkpoint with load_compressed")
        check_bitmap_packed(tensors["bitmask"], values, tensors["row_offsets"], self.in_features, what=what)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = self._packed_names()
        incoming = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        if len(incoming) == len(names):
            # checked before anything is copied: a refused checkpoint leaves the layer as it was
            self._check_packed(incoming, "loaded")
            self._pending_load = frozenset()
        elif incoming:  # part of the packed weight: checked when the rest has come (see _refresh_after_load)
            self._pending_load = self._pending_load | frozenset(incoming)
        self._loaded_now = bool(incoming)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _cslt_possible(self, device: torch.device, dtype: torch.dtype) -> bool:
        # getattr: a SparseLinear pickled before the cslt option has no use_cslt (it allowed the path)
        return (getattr(self, "use_cslt", True) and device.type == "cuda" and self.kind == "nm"
                and (self.n, self.m) == (2, 4) and dtype in _CSLT_DTYPES and hasattr(torch, "_cslt_sparse_mm")
                and torch.backends.cusparselt.is_available()
                and self.out_features % _CSLT_OUT_MULTIPLE == 0 and self.in_features % _CSLT_IN_MULTIPLE == 0)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros in the weight (N:M: N/M, counting stored zeros as kept)."""
        if self.kind == "nm":
            return self.n / self.m
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def packed_bytes(self) -> int:
        """Bytes of the persistent packed weight (bias excluded)."""
        if self.kind == "nm":
            return self.values.numel() * self.values.element_size() + self.index_codes.numel()
        return (self.values.numel() * self.values.element_size() + self.bitmask.numel() * 8
                + self.row_offsets.numel() * 8)

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------
    def path(self, rows: int, device: torch.device, dtype: torch.dtype, requires_grad: bool = False) -> str:
        """The forward path a call with ``rows`` rows of x on ``device`` in ``dtype`` takes: "sparse",
        "cslt", "dense", "unpack" or "grad" (see the module docstring)."""
        if requires_grad:
            return "grad"
        if device.type == "cpu":
            if rows <= self._cpu_sparse_max_rows.get(dtype, 0):
                return "sparse"
        elif device.type == "cuda":
            if rows <= self._cuda_sparse_max_rows.get(dtype, 0):
                return "sparse"
            if self.cslt_weight is not None:
                return "cslt"
        return "unpack" if self.dense_weight is None else "dense"

    def _cpu_sparse_limits(self) -> dict[torch.dtype, int]:
        """{dtype: largest M for the packed CPU kernel} for this layer (empty: never), from CPU_SPARSE_MAX_ROWS."""
        if not cpu_sparse_kernels_fast()[0]:
            return {}
        if self.kind == "bitmap":
            numel = self.in_features * self.out_features
            if numel - self.nnz < int(BITMAP_MIN_SPARSITY * numel):
                return {}
            key = "bitmap"
        else:
            key = f"{self.n}:{self.m}"  # patterns without table entries (unmeasured) get no limits
        threads = torch.get_num_threads()
        table = CPU_SPARSE_MAX_ROWS if threads >= 2 else CPU_SPARSE_MAX_ROWS_ONE_THREAD
        limits = {dt: rows for (fmt, dt), rows in table.items() if fmt == key}
        if torch.float32 in limits and not cpu_f32_gemm():
            limits[torch.float32] = min(limits[torch.float32], CPU_F32_MAX_ROWS_WITHOUT_GEMM)
            if threads >= 2 and self.in_features * self.out_features <= CPU_SMALL_WEIGHT:
                for (fmt, dt), rows in CPU_SPARSE_MAX_ROWS_SMALL_WEIGHT.items():
                    if fmt == key and dt in limits:
                        limits[dt] = min(limits[dt], rows)
        if self.dense_fallback == "unpack":
            for (fmt, dt), rows in CPU_SPARSE_MAX_ROWS_UNPACK.items():
                if fmt == key:
                    limits[dt] = max(limits.get(dt, 0), rows)
        if torch.bfloat16 in limits and not cpu_bf16_dot():
            limits[torch.bfloat16] = min(limits[torch.bfloat16], CPU_BF16_MAX_ROWS_WITHOUT_DOT)
        elif torch.bfloat16 in limits and not cpu_bf16_panel():
            limits[torch.bfloat16] = min(limits[torch.bfloat16], CPU_BF16_MAX_ROWS_WITHOUT_PANEL)
        return limits

    def _cuda_sparse_limits(self) -> dict[torch.dtype, int]:
        key = "bitmap" if self.kind == "bitmap" else f"{self.n}:{self.m}"
        return {dt: rows for (fmt, dt), rows in CUDA_SPARSE_MAX_ROWS.items() if fmt == key}

    def refresh_dispatch(self) -> "SparseLinear":
        """Re-decide the kernel limits (after ``torch.set_num_threads``; they are fixed when the layer is
        built so that forward stays a constant for torch.compile)."""
        self._cpu_sparse_max_rows = self._cpu_sparse_limits()
        self._cuda_sparse_max_rows = self._cuda_sparse_limits()
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if self._incomplete:
            missing = sorted(set(self._packed_names()) - self._pending_load)
            raise RuntimeError(f"SparseLinear({self.in_features} -> {self.out_features}, {self.format}) was loaded in "
                               f"part: {', '.join(missing)} not loaded yet (load_state_dict with the rest first)")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects x with in_features={self.in_features} in its last dim, got "
                             f"shape {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            fix = (f"layer.to({x.dtype}) or x.to({self.values.dtype})"
                   if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else f"x.to({self.values.dtype})")
            raise ValueError(f"SparseLinear holds {self.values.dtype} weights but x is {x.dtype}; convert ({fix})")
        if x.device != self.values.device:
            raise ValueError(f"SparseLinear's weight is on {self.values.device} but x is on {x.device}")

    def _packed_op(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nm":
            return torch.ops.sparsekit.nm_linear(x, self.values, self.index_codes, self.n, self.m, self.in_features,
                                                 self.bias)
        return torch.ops.sparsekit.bitmap_linear(x, self.bitmask, self.values, self.row_offsets, self.in_features,
                                                 self.bias)

    def _unpack_op(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nm":
            return torch.ops.sparsekit.nm_unpack_linear(x, self.values, self.index_codes, self.n, self.m,
                                                        self.in_features, self.bias)
        return torch.ops.sparsekit.bitmap_unpack_linear(x, self.bitmask, self.values, self.row_offsets,
                                                        self.in_features, self.bias)

    def _cslt_linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()  # cuSPARSELt reads a dense row-major x
        rows = x2.shape[0]
        if rows == 0:
            return x.new_empty(*lead, self.out_features)
        pad = -rows % _CSLT_ROWS_MULTIPLE
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        # (out, rows) -> (rows, out). The bias goes in, as torch's own semi-structured addmm passes it: added to
        # the float32 sum before the one rounding to x's dtype (adding it to the rounded product rounds twice)
        fused = self.bias is not None and self.bias.dtype == x2.dtype
        y = torch._cslt_sparse_mm(self.cslt_weight, x2.t(), bias=self.bias if fused else None).t()[:rows]
        if self.bias is not None and not fused:
            y = y + self.bias
        return y.contiguous().reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values
        if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):  # as nn.Linear does
            cast = torch.get_autocast_dtype(x.device.type)
            if cast != values.dtype:
                return F.linear(x, self.to_dense(), self.bias)  # autocast casts x, W and b
            x = x.to(cast)
        if (x.ndim == 0 or x.shape[-1] != self.in_features or x.dtype != values.dtype or x.device != values.device
                or self._incomplete):
            self._check_input(x)  # raises, naming the problem
        grad = x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        path = self.path(x.numel() // self.in_features, x.device, x.dtype,
                         requires_grad=grad and torch.is_grad_enabled())
        if path == "sparse":
            return self._packed_op(x)
        if path == "unpack":
            return self._unpack_op(x)
        if path == "dense":
            return F.linear(x, self.dense_weight, self.bias)
        if path == "cslt":
            return self._cslt_linear(x)
        return F.linear(x, self.to_dense(), self.bias)  # "grad"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"sparsity={self.sparsity:.3f}, bias={self.bias is not None}, dense_fallback={self.dense_fallback}")


def _refresh_after_load(module: SparseLinear, _incompatible_keys) -> None:
    # What was loaded came from outside (a checkpoint): a bitmap's row_offsets must match its bits (the kernels
    # check per call, but only the CPU one can raise: CUDA asserts on the device, Triton writes NaN rows) and an
    # N:M group's positions must be distinct (the kernels would disagree on a repeated one). _load_from_state_dict
    # checked a whole packed weight before copying it; one that came in parts is checked here once its last part
    # is in, and until then the layer refuses to run.
    if not module.__dict__.pop("_loaded_now", False):
        return  # this load brought none of the layer's packed buffers
    names = module._packed_names()
    if module._pending_load:
        if module._pending_load != frozenset(names):
            module._incomplete = True
            return
        module._pending_load = frozenset()
        module._incomplete = True  # until the check passes
        module._check_packed({name: getattr(module, name) for name in names}, "loaded in parts")
    module._incomplete = False
    module.nnz = module.values.numel()
    module._refresh_derived()


# ops is imported for its side effect: the sparsekit::nm_linear / bitmap_linear schemas must exist.
_ = ops
