"""Bad input to the public API gets a clear ValueError naming it, and conversions that cannot be held are refused
without damage (found by a review pass of the twelfth session; each case failed before it was mended)."""

import numpy as np
import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.formats import check_nm_packed, nm_index_codes, pack_bitmap, pack_nm, unpack_bitmap
from sparsekit.formats.bitmap import check_bitmap_packed
from sparsekit.nn import LowRankLinear, SparseLinear
from sparsekit.prune import wanda_mask
from tiny_models import tiny_model


def _pruned_24(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        linear.weight.view(-1, 4)[:, :2] = 0
    return linear


def test_sparsify_leaves_linears_whose_torch_nn_parent_reads_their_weight():
    """nn.MultiheadAttention and nn.TransformerEncoderLayer pass their linears' .weight to fused functions: a
    SparseLinear there (no .weight) raised AttributeError on the next forward. They are skipped, with the reason;
    a Sequential's linear is still swapped."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            _pruned_24(m)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = layer(x)
        report = sparsekit.sparsify_(layer)
        assert torch.equal(layer(x), want)
    assert {n for n, _ in report.skipped} == {"self_attn.out_proj", "linear1", "linear2"}
    assert all("reads the weight" in why for _, why in report.skipped)
    dec = nn.TransformerDecoderLayer(64, 4, 128, batch_first=True).eval()  # calls linear1 / linear2
    for m in dec.modules():
        if isinstance(m, nn.Linear):
            _pruned_24(m)
    mem = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = dec(x, mem)
        report = sparsekit.sparsify_(dec)
        torch.testing.assert_close(dec(x, mem), want, rtol=1e-5, atol=1e-5)
    assert {r.name for r in report.layers} == {"linear1", "linear2"}
    assert {n for n, _ in report.skipped} == {"self_attn.out_proj", "multihead_attn.out_proj"}

    class MyAttention(nn.MultiheadAttention):  # a subclass inherits the forward that reads out_proj.weight
        pass

    attn = MyAttention(64, 4, batch_first=True)
    _pruned_24(attn.out_proj)
    assert [n for n, _ in sparsekit.sparsify_(attn).skipped] == ["out_proj"]
    seq = nn.Sequential(_pruned_24(nn.Linear(64, 32)), nn.ReLU())
    assert len(sparsekit.sparsify_(seq).layers) == 1 and isinstance(seq[0], SparseLinear)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_module_type_keeps_the_packed_integers(fmt):
    """Module.type(float16) converts every tensor: the codes, bitmask and row offsets became float16 (row offsets
    losing bits) and the next forward failed. They keep their dtype; the values convert."""
    torch.manual_seed(1)
    layer = SparseLinear.from_linear(_pruned_24(nn.Linear(64, 32)), format=fmt)
    ints = {n: b.dtype for n, b in layer.named_buffers() if not b.is_floating_point()}
    x = torch.randn(3, 64)
    want = layer(x)
    layer.type(torch.float16)
    assert {n: b.dtype for n, b in layer.named_buffers() if not b.is_floating_point()} == ints
    assert layer.values.dtype == torch.float16
    torch.testing.assert_close(layer(x.half()).float(), want, rtol=2e-2, atol=2e-2)


def test_a_refused_model_conversion_says_how_to_recover():
    m = tiny_model("llama")
    for mod in m.modules():
        if isinstance(mod, nn.Linear) and mod is not m.get_output_embeddings():
            _pruned_24(mod)
    sparsekit.sparsify_(m)
    with pytest.raises(ValueError, match=r"model.float\(\)"):
        m.double()
    m.float()
    m(input_ids=torch.randint(0, 200, (1, 5)))


def test_empty_output_path_is_refused(tmp_path, monkeypatch):
    """abspath("") is the working directory: with overwrite=True its files were replaced by the checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    m = tiny_model("llama")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="output path is empty"):
            sparsekit.save_compressed(m, "", overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("sparsity", [1.0, -0.01, float("nan")])
def test_wanda_mask_checks_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        wanda_mask(torch.randn(4, 8), torch.rand(8), sparsity)


def test_format_and_layer_arguments():
    w = torch.randn(4, 8)
    w.view(-1, 4)[:, :2] = 0
    p = pack_nm(w, 2, 4)
    codes = nm_index_codes(p.indices, 4)
    check_nm_packed(p.values, codes, 2, 4, np.int64(8))  # a numpy integer is an integer
    with pytest.raises(ValueError, match="in_features must be an integer"):
        check_nm_packed(p.values, codes, 2, 4, 8.0)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        nm_index_codes(torch.tensor([[0.0, 1.9]]), 4)  # it truncated 1.9 to 1
    assert unpack_bitmap(pack_bitmap(torch.zeros(0, 8))).shape == (0, 8)
    bm = pack_bitmap(w)
    with pytest.raises(ValueError, match="bitmask must be a 2-D int64"):
        check_bitmap_packed(bm.bitmask.float(), bm.values, bm.row_offsets, 8)
    with pytest.raises(ValueError, match="bitmask must be a 2-D int64"):
        check_bitmap_packed(bm.bitmask.flatten(), bm.values, bm.row_offsets, 8)
    with pytest.raises(ValueError, match="num_pruned must be an integer"):
        sparsekit.ops.rowwise_prune_mask(torch.randn(3, 4), 3.0)
    assert int(sparsekit.ops.rowwise_prune_mask(torch.randn(3, 4), np.int64(2)).sum()) == 6
    with pytest.raises(ValueError, match="has no elements"):
        SparseLinear.from_linear(nn.Linear(0, 8))
    for rank in (8.0, True, 0):
        with pytest.raises(ValueError, match="rank must be (an integer|>= 1)"):
            LowRankLinear.from_linear(nn.Linear(64, 64), rank)
    assert LowRankLinear.from_linear(nn.Linear(64, 64), np.int64(8)).rank == 8
