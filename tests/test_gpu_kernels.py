"""sparsekit's CUDA implementations against the plain-PyTorch reference, on a CUDA device.

Two implementations are checked on realistic shapes (Llama-2-7B's MLP, a 16384-token calibration chunk):
* the dispatched op ``torch.ops.sparsekit.*``: the CUDA C++ kernels where ``sparsekit._C_cuda`` is built,
  else the Triton kernels (``sparsekit._backends`` registers them on the CUDA key);
* the Triton functions called directly (``sparsekit.kernels.triton.dispatch``), whichever is dispatched.
Then ``torch.library.opcheck`` on CUDA tensors and a CUDA-graph capture.

Tolerances follow tests/test_triton_kernels.py: masks exact; wanda_score bit-exact against a correctly
rounded oracle, and within 2**-21 relative of the reference (whose float32 sqrt may be off by one ulp);
channel_sqnorm_accumulate_ and both sums of channel_stats_accumulate_ within (T + 2) * 2**-24 relative of a
float64 sum (the worst case of any float32 summation order of nonnegative terms). Every test carries the
``gpu`` marker: skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import sparsekit
from sparsekit.ops import reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = 2.0**-24

LLAMA2_7B_DOWN = (4096, 11008)  # mlp.down_proj weight (out, in)
CALIB_CHUNK = (16384, 4096)  # 16384 tokens of Llama-2-7B hidden states


def _impls():
    """(nm_mask, wanda_score, channel_sqnorm_accumulate_, channel_stats_accumulate_) for each implementation
    live on CUDA."""
    status = sparsekit.backend_status()
    dispatched = "CUDA C++" if status["cuda"].live else "Triton (dispatched)"
    impls = [
        pytest.param(
            (torch.ops.sparsekit.nm_mask, torch.ops.sparsekit.wanda_score,
             torch.ops.sparsekit.channel_sqnorm_accumulate_, torch.ops.sparsekit.channel_stats_accumulate_),
            id=dispatched,
        )
    ]
    try:
        from sparsekit.kernels.triton import dispatch
    except ImportError:  # triton missing: only the dispatched path
        return impls
    impls.append(pytest.param((dispatch.nm_mask, dispatch.wanda_score, dispatch.channel_sqnorm_accumulate_,
                               dispatch.channel_stats_accumulate_), id="Triton"))
    return impls


IMPLS = _impls()


def _wanda_exact(weight, sq_norm):
    root = sq_norm.double().sqrt().float()
    return (weight.float().abs().double() * root.double()).float()


def _with_specials(score):
    tiny = 1e-40 if score.dtype in (torch.float32, torch.bfloat16) else 1e-7
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, tiny, -tiny],
                            dtype=score.dtype, device=score.device)
    out = score.clone().reshape(-1)
    where = torch.randint(0, out.numel(), (out.numel() // 4,), device=score.device)
    out[where] = specials[torch.randint(0, len(specials), where.shape, device=score.device)]
    return out.reshape(score.shape)


def test_report_backends():
    status = sparsekit.backend_status()
    for name, b in status.items():
        print(f"{name}: live={b.live} ({b.detail})")
    assert status["default"].live


# ----------------------------------------------------------------------------------------------------
# nm_mask
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_llama_shape(impl, dtype, n, m):
    nm_mask = impl[0]
    score = torch.randn(*LLAMA2_7B_DOWN, device="cuda", dtype=dtype)
    keep = nm_mask(score, n, m)
    assert keep.dtype == torch.bool and keep.shape == score.shape
    assert torch.equal(keep, reference.nm_mask_reference(score, n, m))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows,cols,n,m", [(7, 28, 2, 4), (33, 96, 1, 2), (5, 48, 8, 16), (9, 21, 1, 3),
                                           (6, 64, 16, 32), (3, 128, 40, 64), (4, 20, 0, 4), (1, 4100, 2, 4)])
def test_nm_mask_patterns_ties_specials(impl, dtype, rows, cols, n, m):
    nm_mask = impl[0]
    for score in (torch.randn(rows, cols, device="cuda", dtype=dtype),
                  torch.randint(0, 3, (rows, cols), device="cuda").to(dtype),
                  _with_specials(torch.randn(rows, cols, device="cuda", dtype=dtype))):
        # The oracle on CPU: torch.sort there compares floats (CUDA's radix sort may order -0.0 before +0.0).
        assert torch.equal(nm_mask(score, n, m).cpu(), reference.nm_mask_reference(score.cpu(), n, m))


@pytest.mark.parametrize("impl", IMPLS)
def test_nm_mask_strided_and_misaligned(impl):
    nm_mask = impl[0]
    base = torch.randn(4101, 64, device="cuda", dtype=torch.bfloat16)
    for score in (base[1:].t(), base.reshape(-1)[1:1 + 64 * 4096].reshape(64, 4096)):  # transposed; 2-byte offset
        assert torch.equal(nm_mask(score, 2, 4), reference.nm_mask_reference(score.contiguous(), 2, 4))


# ----------------------------------------------------------------------------------------------------
# wanda_score
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [LLAMA2_7B_DOWN, (11008, 4096), (37, 1001), (1, 3)])
def test_wanda_score(impl, dtype, shape):
    wanda_score = impl[1]
    weight = torch.randn(*shape, device="cuda", dtype=dtype)
    sq_norm = torch.rand(shape[1], device="cuda") * 1000
    out = wanda_score(weight, sq_norm)
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.equal(out, _wanda_exact(weight, sq_norm))
    torch.testing.assert_close(out, reference.wanda_score_reference(weight, sq_norm), rtol=2.0**-21, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_wanda_score_strided(impl):
    wanda_score = impl[1]
    weight = torch.randn(1000, 512, device="cuda", dtype=torch.float16).t()  # (512, 1000), non-contiguous
    sq_norm = torch.rand(2000, device="cuda")[::2]  # non-contiguous norms
    assert torch.equal(wanda_score(weight, sq_norm), _wanda_exact(weight, sq_norm))


# ----------------------------------------------------------------------------------------------------
# channel_sqnorm_accumulate_
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,shape", [
    (torch.bfloat16, CALIB_CHUNK),
    (torch.float16, CALIB_CHUNK),
    (torch.float32, (4, 2048, 4096)),
    (torch.bfloat16, (8, 512, 11008)),
    (torch.float16, (1000, 4095)),  # odd width: scalar path
    (torch.float32, (3, 5)),
])
def test_channel_sqnorm_accumulate(impl, dtype, shape):
    accumulate = impl[2]
    x = torch.randn(*shape, device="cuda", dtype=dtype) * 2
    acc = torch.rand(shape[-1], device="cuda")
    tokens = x.numel() // shape[-1]
    exact = acc.double() + x.double().reshape(tokens, -1).pow(2).sum(0)
    expect = acc.clone()
    reference.channel_sqnorm_accumulate_reference_(expect, x)
    accumulate(acc, x)
    bound = (tokens + 2) * U
    assert ((acc.double() - exact).abs() <= bound * exact).all()
    torch.testing.assert_close(acc, expect, rtol=2 * bound, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_channel_sqnorm_accumulate_misaligned(impl):
    accumulate = impl[2]
    base = torch.randn(64 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].reshape(64, 4096)  # 2-byte offset: no 16-byte vectors
    acc = torch.zeros(4096, device="cuda")
    accumulate(acc, x)
    exact = x.double().pow(2).sum(0)
    assert ((acc.double() - exact).abs() <= 66 * U * exact).all()


# ----------------------------------------------------------------------------------------------------
# channel_stats_accumulate_: sum x^2 and sum |x| from one read of x
# ----------------------------------------------------------------------------------------------------
def _stats_exact(sq_acc, abs_acc, x):
    x2 = (x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)).double()
    return sq_acc.double() + x2.pow(2).sum(0), abs_acc.double() + x2.abs().sum(0)


def _assert_stats(sq, ab, exact_sq, exact_ab, tokens):
    bound = (tokens + 2) * U
    assert ((sq.double() - exact_sq).abs() <= bound * exact_sq).all()
    assert ((ab.double() - exact_ab).abs() <= bound * exact_ab).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,shape", [
    (torch.bfloat16, CALIB_CHUNK),
    (torch.float16, CALIB_CHUNK),
    (torch.float32, (4, 2048, 4096)),
    (torch.bfloat16, (8, 512, 11008)),
    (torch.float16, (1000, 4095)),  # odd width: scalar path
    (torch.bfloat16, (33, 7)),
    (torch.float32, (3, 5)),
    (torch.bfloat16, (1,)),
])
def test_channel_stats_accumulate(impl, dtype, shape):
    accumulate = impl[3]
    x = torch.randn(*shape, device="cuda", dtype=dtype) * 2
    sq, ab = torch.rand(shape[-1], device="cuda"), torch.rand(shape[-1], device="cuda")
    tokens = x.numel() // shape[-1]
    exact_sq, exact_ab = _stats_exact(sq, ab, x)
    expect_sq, expect_ab = sq.clone(), ab.clone()
    reference.channel_stats_accumulate_reference_(expect_sq, expect_ab, x)
    accumulate(sq, ab, x)
    _assert_stats(sq, ab, exact_sq, exact_ab, tokens)
    bound = (tokens + 2) * U
    torch.testing.assert_close(sq, expect_sq, rtol=2 * bound, atol=0)
    torch.testing.assert_close(ab, expect_ab, rtol=2 * bound, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_channel_stats_accumulate_misaligned_strided_empty(impl):
    accumulate = impl[3]
    base = torch.randn(64 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].reshape(64, 4096)  # 2-byte offset: no 16-byte vectors
    buf = torch.zeros(2, 4096, device="cuda")  # two disjoint halves of one buffer
    accumulate(buf[0], buf[1], x)
    _assert_stats(buf[0], buf[1], *_stats_exact(torch.zeros_like(buf[0]), torch.zeros_like(buf[1]), x), 64)
    x = torch.randn(2048, 96, device="cuda", dtype=torch.float16).t()  # (96, 2048), channels strided
    sq, ab = torch.rand(2048, device="cuda"), torch.rand(2048, device="cuda")
    exact = _stats_exact(sq, ab, x)
    accumulate(sq, ab, x)
    _assert_stats(sq, ab, *exact, 96)
    before = sq.clone(), ab.clone()
    accumulate(sq, ab, torch.randn(0, 2048, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(sq, before[0]) and torch.equal(ab, before[1])
    empty = torch.zeros(0, device="cuda")  # zero channels: a (-1, 0) reshape used to raise here
    accumulate(empty, empty.clone(), torch.randn(3, 0, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("impl", IMPLS)
def test_channel_stats_accumulate_rejects_overlap(impl):
    accumulate = impl[3]
    acc = torch.zeros(64, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="overlap"):
        accumulate(acc, acc, torch.randn(3, 64, device="cuda"))


# ----------------------------------------------------------------------------------------------------
# The dispatcher contract: opcheck, CUDA graphs
# ----------------------------------------------------------------------------------------------------
def test_opcheck_cuda():
    score = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparsekit.nm_mask.default, (score, 2, 4))
    weight = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    sq_norm = torch.rand(128, device="cuda")
    torch.library.opcheck(torch.ops.sparsekit.wanda_score.default, (weight, sq_norm))
    acc = torch.rand(128, device="cuda")
    x = torch.randn(3, 17, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparsekit.channel_sqnorm_accumulate_.default, (acc, x))
    abs_acc = torch.rand(128, device="cuda")
    torch.library.opcheck(torch.ops.sparsekit.channel_stats_accumulate_.default, (acc, abs_acc, x))
    odd = torch.randn(5, 33, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparsekit.channel_stats_accumulate_.default,
                          (torch.rand(33, device="cuda"), torch.rand(33, device="cuda"), odd))


def test_cuda_graph_capture():
    """The ops launch without host syncs, so a calibration step can be captured and replayed."""
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(4096, device="cuda")
    sq, ab = torch.zeros(4096, device="cuda"), torch.zeros(4096, device="cuda")
    sparsekit.ops.channel_sqnorm_accumulate_(acc, x)  # warm up (Triton compiles here, not under capture)
    sparsekit.ops.channel_stats_accumulate_(sq, ab, x)
    keep = sparsekit.ops.nm_mask(sparsekit.ops.wanda_score(x, acc), 2, 4)
    torch.cuda.synchronize()
    acc.zero_()
    sq.zero_()
    ab.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparsekit.ops.channel_sqnorm_accumulate_(acc, x)
        sparsekit.ops.channel_stats_accumulate_(sq, ab, x)
        keep = sparsekit.ops.nm_mask(sparsekit.ops.wanda_score(x, acc), 2, 4)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    exact = 2 * x.double().pow(2).sum(0)
    assert ((acc.double() - exact).abs() <= 4100 * U * exact).all()
    assert ((sq.double() - exact).abs() <= 4100 * U * exact).all()
    exact_abs = 2 * x.double().abs().sum(0)
    assert ((ab.double() - exact_abs).abs() <= 4100 * U * exact_abs).all()
    assert torch.equal(keep, reference.nm_mask_reference(reference.wanda_score_reference(x, acc), 2, 4))
