"""SparseGPT against a naive (unblocked) OBS implementation, and the statistics groups it relies on."""

import pytest
import torch

from sparsekit.calibrate import capture_layer_inputs, collect_input_stats
from sparsekit.models import find_decoder_layers, find_linears
from sparsekit.sparsegpt import SparseGPTError, prepare_hessian_inverse, sparsegpt_prune_
from tiny_models import random_windows, tiny_model


def correlated_inputs(tokens, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return torch.randn(tokens, cols, generator=g) @ mix


def naive_sparsegpt(w, xtx, tokens, sparsity, pattern, blocksize, percdamp=0.01):
    """Column by column, every update applied at once to all later columns (no lazy batching).

    Masks are chosen at the same points as the blocked algorithm (block starts, or every M columns), so the
    two must agree up to float rounding."""
    w = w.clone().double()
    h = xtx.double() * 2 / tokens
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    prune = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if pattern is None and j % blocksize == 0:
            b1 = min(j + blocksize, cols)
            sal = (w[:, j:b1] / torch.diagonal(u)[j:b1]) ** 2
            k = int(sal.numel() * sparsity)
            order = torch.sort(sal.flatten(), stable=True).indices[:k]
            blk = torch.zeros(sal.numel(), dtype=torch.bool)
            blk[order] = True
            prune[:, j:b1] = blk.reshape(sal.shape)
        if pattern is not None and j % pattern[1] == 0:
            n, m = pattern
            sal = (w[:, j:j + m] / torch.diagonal(u)[j:j + m]) ** 2
            idx = torch.sort(sal, dim=1, stable=True).indices[:, :n]
            prune[:, j:j + m].scatter_(1, idx, True)
        e = torch.where(prune[:, j], w[:, j], torch.zeros_like(w[:, j])) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
        w[prune[:, j], j] = 0
    return w.float(), ~prune


@pytest.mark.parametrize("pattern,sparsity,blocksize", [(None, 0.5, 16), (None, 0.7, 32), ((2, 4), 0.5, 16),
                                                         ((4, 8), 0.5, 64)])
def test_blocked_equals_naive(pattern, sparsity, blocksize):
    rows, cols, tokens = 24, 64, 512
    x = correlated_inputs(tokens, cols)
    xtx = x.t() @ x
    w = torch.randn(rows, cols)
    want_w, want_keep = naive_sparsegpt(w, xtx, tokens, sparsity, pattern, blocksize)
    got = w.clone()
    keep = sparsegpt_prune_(got, xtx, tokens, sparsity, pattern, blocksize=blocksize)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want_w, rtol=1e-4, atol=1e-4)
    assert torch.equal(got == 0, ~keep)
    if pattern is None:
        per_block = (~keep).reshape(rows, cols // blocksize, blocksize).sum(dim=(0, 2))
        assert (per_block == int(rows * blocksize * sparsity)).all()
    else:
        n, m = pattern
        assert ((~keep).reshape(rows, -1, m).sum(-1) == n).all()


def test_weight_update_lowers_reconstruction_error():
    rows, cols, tokens = 32, 64, 1024
    x = correlated_inputs(tokens, cols, seed=3)
    w = torch.randn(rows, cols)
    pruned = w.clone()
    keep = sparsegpt_prune_(pruned, x.t() @ x, tokens, 0.5, (2, 4), blocksize=32)
    masked_only = w * keep  # same mask, no compensation
    err = lambda v: float(((x @ (w - v).t()) ** 2).sum())  # noqa: E731
    assert err(pruned) < 0.8 * err(masked_only)


def test_dead_columns_are_zeroed_and_not_nan():
    rows, cols, tokens = 8, 16, 64
    x = correlated_inputs(tokens, cols)
    x[:, 3] = 0
    w = torch.randn(rows, cols)
    sparsegpt_prune_(w, x.t() @ x, tokens, 0.5, None, blocksize=8)
    assert (w[:, 3] == 0).all() and torch.isfinite(w).all()


def test_non_positive_definite_hessian_raises_damping_with_warning():
    cols = 16
    x = torch.randn(4, cols)  # rank 4 < 16: singular without damping
    w = torch.randn(8, cols)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        prepare_hessian_inverse(x.t() @ x, 4, w.clone(), percdamp=0.0)
    with pytest.warns(RuntimeWarning):
        sparsegpt_prune_(w, x.t() @ x, 4, 0.5, None, blocksize=8, percdamp=0.0)
    assert torch.isfinite(w).all()


def test_fallback_damping_follows_the_hessian_scale():
    """With percdamp 0 the first fallback is relative to mean(diag H): a rank-1 Hessian of activations ~1e4
    (diag ~1e8) factors after a few tries instead of failing with an absolute 1e-6 that grows to 10."""
    x = torch.full((1, 16), 1e4) * torch.linspace(0.5, 1.5, 16)
    w = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        upper = prepare_hessian_inverse(x.t() @ x, 1, w.clone(), percdamp=0.0)
    assert torch.isfinite(upper).all()


def test_non_finite_statistics_are_named():
    xtx = torch.eye(8)
    xtx[2, 3] = float("inf")
    with pytest.raises(SparseGPTError, match="hold inf or NaN"):
        prepare_hessian_inverse(xtx, 10, torch.randn(4, 8))


def test_weights_past_the_dtype_range_are_an_error_not_inf():
    """float16 weights whose OBS updates leave its range: an error naming the dtype, the weight unchanged (the
    float32 result is checked before the cast, the cast result before it is written back)."""
    x = torch.randn(64, 1) + 0.05 * correlated_inputs(64, 16)  # strongly correlated input channels
    w = torch.full((4, 16), 40000.0, dtype=torch.float16)
    before = w.clone()
    with pytest.raises(SparseGPTError, match="do not fit torch.float16"):
        sparsegpt_prune_(w, x.t() @ x, 64, 0.5, None, blocksize=16)
    assert torch.equal(w, before)


def test_overflowed_statistics_are_an_error_for_every_method():
    """A float16 model whose residual stream overflows: Wanda (and OWL's ratios) used to prune on NaN scores and
    report success; every calibrated method now stops at the block, naming the linears."""
    from sparsekit.prune import PruneSpec, prune_model

    for method, profile in (("wanda", "uniform"), ("wanda", "owl"), ("sparsegpt", "uniform")):
        m = tiny_model("llama", layers=2).half()
        m.model.embed_tokens.weight.data.fill_(60000.0)
        m.model.layers[0].self_attn.v_proj.weight.data.fill_(1.0)
        m.model.layers[0].self_attn.o_proj.weight.data.fill_(2.0)  # residual 60000 + 8192: inf in float16
        with pytest.raises(ValueError, match=r"decoder block 0: the calibration statistics of .*mlp.* hold inf"):
            prune_model(m, PruneSpec(method, 0.5, profile=profile), random_windows(2, 8), progress=False)


def test_no_tokens_is_an_error():
    with pytest.raises(SparseGPTError, match="no calibration tokens"):
        prepare_hessian_inverse(torch.zeros(4, 4), 0, torch.zeros(2, 4))


def test_bad_shapes():
    with pytest.raises(ValueError, match="xtx must be"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(4), 10, 0.5)
    with pytest.raises(ValueError, match="does not divide"):
        sparsegpt_prune_(torch.randn(4, 6), torch.eye(6), 10, 0.5, (2, 4))


def test_inputs_shared_by_projections_share_one_set_of_statistics():
    model = tiny_model("llama")
    layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, random_windows(3, 16))
    linears = find_linears(layers[0])
    stats = collect_input_stats(layers[0], linears, inputs, hessian=True, abs_sum=True)
    a = "self_attn."
    assert stats[a + "q_proj"] is stats[a + "k_proj"] is stats[a + "v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    # the shared Hessian is exactly X^T X of the q/k/v input, summed over all windows
    xs = []
    h = linears[a + "q_proj"].register_forward_pre_hook(lambda m, args: xs.append(args[0].reshape(-1, 64)))
    collect_input_stats(layers[0], {a + "q_proj": linears[a + "q_proj"]}, inputs)
    h.remove()
    x = torch.cat(xs)
    torch.testing.assert_close(stats[a + "q_proj"].xtx, x.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[a + "q_proj"].sq_norm, (x * x).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[a + "q_proj"].abs_sum, x.abs().sum(0), rtol=1e-5, atol=1e-5)
    for st in stats.values():  # the lower block triangle was mirrored: exactly symmetric when returned
        assert torch.equal(st.xtx, st.xtx.t())
    assert stats[a + "q_proj"].tokens == x.shape[0] == 48
