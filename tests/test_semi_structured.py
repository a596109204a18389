"""Conversion between sparsekit's 2:4 packing and torch's semi-structured (CUTLASS) layout
(sparsekit.formats.semi_structured).

The oracle is torch's own pure-PyTorch converters, which run on CPU:
``sparse_semi_structured_from_dense_cutlass`` (dense -> packed, meta) and
``sparse_semi_structured_to_dense_cutlass``. Everything is compared exactly. On a GPU, the converted tensor
is used in torch's semi-structured matmul against the dense product.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from sparsekit import ops
from sparsekit.formats import (
    from_torch_semi_structured,
    nm_index_codes,
    pack_nm,
    to_sparse_semi_structured_tensor,
    to_torch_semi_structured,
    unpack_nm,
)
from sparsekit.formats.sparse24 import NMPacked, nm_indices_from_codes
from sparsekit.nn import SparseLinear
from linear_check import assert_linear_close

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(32, 64), (64, 128), (96, 320), (128, 1024)]  # torch's minimum (32, 64) and its multiples


def _id(v):
    return str(v).removeprefix("torch.")


def weight_24(rows, cols, dtype):
    """2:4 by |W|: every group keeps exactly 2 non-zeros (randn is never exactly 0)."""
    w = torch.randn(rows, cols)
    return (w * ops.nm_mask(w.abs(), 2, 4)).to(dtype)


def packed_24(w):
    p = pack_nm(w, 2, 4)
    return p.values, nm_index_codes(p.indices, 4)


def unpacked(values, codes):
    indices = nm_indices_from_codes(codes, 4, values.shape[1])
    return unpack_nm(NMPacked(values, indices, (values.shape[0], 2 * values.shape[1]), 2, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_to_torch_equals_torchs_converter(shape, dtype):
    w = weight_24(*shape, dtype)
    packed, meta = to_torch_semi_structured(*packed_24(w))
    want_packed, want_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert packed.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(packed, want_packed) and torch.equal(meta, want_meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_from_torch_equals_sparsekit_packing(shape, dtype):
    w = weight_24(*shape, dtype)
    values, codes = from_torch_semi_structured(*sparse_semi_structured_from_dense_cutlass(w))
    want_values, want_codes = packed_24(w)
    assert torch.equal(values, want_values) and torch.equal(codes, want_codes)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_groups_with_fewer_non_zeros_round_trip(dtype):
    """sparsekit and torch fill a short group's second slot with different zero positions: the metadata
    differs there, the dense matrix does not, in either direction."""
    w = weight_24(64, 128, dtype)
    w[w.abs() < 0.6] = 0  # many groups now hold 0 or 1 non-zeros
    w[5] = 0
    values, codes = packed_24(w)
    packed, meta = to_torch_semi_structured(values, codes)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)
    back = from_torch_semi_structured(packed, meta)
    assert torch.equal(back[0], values) and torch.equal(back[1], codes)  # our own positions come back
    from_torch = from_torch_semi_structured(*sparse_semi_structured_from_dense_cutlass(w))
    assert torch.equal(unpacked(*from_torch), w)
    assert torch.equal(ops.nm_unpack(*from_torch, 2, 4, 128), w)


def test_from_torch_swaps_decreasing_positions_and_rejects_repeats():
    w = weight_24(32, 64, torch.float16)
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    # swap both the 4-bit positions and the two values of every group: the same matrix, encoded backwards
    words = meta.to(torch.int32) & 0xFFFF
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(4)], -1)
    swapped = ((nib & 3) << 2) | (nib >> 2)
    new_words = (swapped << (4 * torch.arange(4))).sum(-1)
    new_meta = torch.where(new_words >= 1 << 15, new_words - (1 << 16), new_words).to(torch.int16)
    new_packed = packed.reshape(32, -1, 2).flip(-1).reshape(32, 32)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(new_packed, new_meta), w)
    values, codes = from_torch_semi_structured(new_packed, new_meta)
    assert torch.equal(unpacked(values, codes), w)
    with pytest.raises(ValueError, match="names position 0 twice"):
        from_torch_semi_structured(packed, torch.zeros_like(meta))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_tensor_subclass_from_sparse_linear(dtype):
    lin = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.mul_(ops.nm_mask(lin.weight.abs(), 2, 4))
    lin = lin.to(dtype)
    layer = SparseLinear.from_linear(lin, "2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "prototype" warning
        t = to_sparse_semi_structured_tensor(layer.values, layer.index_codes)
    assert type(t).__name__ == "SparseSemiStructuredTensorCUTLASS" and t.shape == (64, 128)
    assert torch.equal(t.to_dense(), lin.weight.detach())
    values, codes = from_torch_semi_structured(t)
    assert torch.equal(values, layer.values) and torch.equal(codes, layer.index_codes)


def _bad_to_torch():
    values, codes = packed_24(weight_24(32, 64, torch.float16))
    return [
        ((values.float(), codes), "float32.*1:2"),
        ((values.double(), codes), "float16 or bfloat16"),
        ((values[:16], codes[:16]), r"multiple of 32 and in_features a positive multiple of 64, got \(16, 64\)"),
        ((values[:, :16], codes[:, :4]), r"got \(32, 32\)"),
        ((values, codes[:, :-1]), "index_codes must be uint8"),
        ((values, torch.zeros_like(codes)), "two distinct positions"),
        ((values.reshape(-1), codes), "2-D"),
    ]


@pytest.mark.parametrize("args,match", _bad_to_torch())
def test_to_torch_errors(args, match):
    with pytest.raises(ValueError, match=match):
        to_torch_semi_structured(*args)


def test_from_torch_errors():
    packed, meta = sparse_semi_structured_from_dense_cutlass(weight_24(32, 64, torch.bfloat16))
    with pytest.raises(ValueError, match="meta must be int16"):
        from_torch_semi_structured(packed, meta.int())
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        from_torch_semi_structured(packed.float(), meta)
    with pytest.raises(ValueError, match="SparseSemiStructuredTensorCUTLASS holding both"):
        from_torch_semi_structured(packed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_semi_structured_matmul_matches_dense(dtype):
    """The converted tensor runs torch's CUTLASS 2:4 GEMM, which torch builds for compute capability 8.x only
    (on sm_90 it raises "Supported only on GPUs with compute capability 8.x")."""
    if torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("torch's CUTLASS semi-structured kernels run on compute capability 8.x only")
    w = weight_24(128, 256, dtype).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = to_sparse_semi_structured_tensor(*packed_24(w))
    assert torch.equal(t.to_dense(), w)
    x = torch.randn(64, 256, device="cuda").to(dtype)
    assert_linear_close(F.linear(x, t).cpu(), x.cpu(), w.cpu(), None)  # fp32 accumulation, one rounding
