"""Pruning semantics (hand-worked), and layer-by-layer pruning across architectures."""

import pytest
import torch

from sparsekit import ops
from sparsekit.calibrate import capture_layer_inputs, collect_input_stats, run_layer
from sparsekit.models import find_decoder_layers, find_linears, linear_weight
from sparsekit.prune import PruneSpec, magnitude_mask, parse_pattern, prune_model, wanda_mask
from tiny_models import ARCHS, random_windows, tiny_model

T, F = True, False

# Three rows, ties included. sq_norm -> ||X_j|| = [4, 1, 1, 2].
W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                  [4.0, 3.0, -2.0, 1.0],
                  [2.0, 1.0, 2.0, 1.0]])
SQ = torch.tensor([16.0, 1.0, 1.0, 4.0])
# Wanda scores: [[4, 2, 3, 8], [16, 3, 2, 2], [8, 1, 2, 2]]


def test_wanda_unstructured_compares_within_each_row():
    keep = wanda_mask(W, SQ, 0.5)
    # row 1: the tied 2s at columns 2 and 3 both go; row 2: 1 (col 1), then of the tied 2s the lower index (col 2)
    assert torch.equal(keep, torch.tensor([[T, F, F, T], [T, T, F, F], [T, F, F, T]]))
    assert (keep.sum(dim=1) == 2).all()  # per-row count, not a layer-wide threshold


def test_wanda_uses_norm_not_squared_norm():
    # norms [3, 1] -> scores [3, 4]: column 0 goes. With ||X||^2 the scores would be [9, 4] and column 1 would go.
    w = torch.tensor([[1.0, 4.0], [4.0, 1.0]])
    sq = torch.tensor([9.0, 1.0])
    assert torch.equal(wanda_mask(w, sq, 0.5), torch.tensor([[F, T], [T, F]]))
    assert torch.equal(ops.rowwise_prune_mask(w.abs() * sq, 1), torch.tensor([[T, F], [T, F]]))


def test_magnitude_unstructured_is_one_threshold_per_matrix():
    keep = magnitude_mask(W, 0.5)
    # |W| flat = [1,2,3,4, 4,3,2,1, 2,1,2,1]; prune 6: the four 1s (0,7,9,11), then 2s at 1 and 6 (stable)
    assert torch.equal(keep, torch.tensor([[F, F, T, T], [T, T, F, F], [T, F, T, F]]))
    assert int((~keep).sum()) == 6
    assert keep.sum(dim=1).tolist() == [2, 2, 2]  # happens to be even here; differs from wanda in rows 0, 2


def test_nm_semantics_hand_worked():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      [4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0]])
    sq = torch.tensor([1.0, 4.0, 9.0, 16.0, 16.0, 9.0, 4.0, 1.0])  # norms [1,2,3,4,4,3,2,1]
    # wanda scores: row0 [1,2,3,4,4,3,2,1]; row1 [4,4,3,4,4,3,2,4]
    assert torch.equal(wanda_mask(w, sq, 0.5, (2, 4)),
                       torch.tensor([[F, F, T, T, T, T, F, F], [F, T, F, T, T, F, F, T]]))
    # magnitude 2:4: row0 all tied -> first two of each group; row1 |W| groups [4,2,1,1], [1,1,1,4]
    assert torch.equal(magnitude_mask(w, 0.5, (2, 4)),
                       torch.tensor([[F, F, T, T, F, F, T, T], [T, T, F, F, F, F, T, T]]))
    # 4:8 on the wanda scores: row0 prunes 1(0), 1(7), 2(1), 2(6); row1 prunes 2(6), 3(2), 3(5), then 4 at col 0
    assert torch.equal(wanda_mask(w, sq, 0.5, (4, 8)),
                       torch.tensor([[F, F, T, T, T, T, F, F], [F, T, F, T, T, F, F, T]]))


def test_parse_pattern_and_spec_errors():
    assert parse_pattern("2:4") == (2, 4)
    for bad in ["2-4", "a:b", "4:4", "5:4", "0:4", ":4"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)
    for s in [1.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            PruneSpec("wanda", s)
    with pytest.raises(ValueError, match="contradicts"):
        PruneSpec("wanda", 0.7, (2, 4))
    with pytest.raises(ValueError, match="unknown method"):
        PruneSpec("random", 0.5)
    assert PruneSpec("wanda", None, (2, 4)).sparsity == 0.5


def _zeros_per_row(w):
    return (w == 0).sum(dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,pattern", [("wanda", None), ("wanda", (2, 4)), ("magnitude", None),
                                            ("magnitude", (4, 8)), ("sparsegpt", None), ("sparsegpt", (2, 4))])
def test_prune_every_architecture(arch, method, pattern):
    model = tiny_model(arch)
    emb_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    windows = random_windows(4, 24)
    report = prune_model(model, PruneSpec(method, 0.5, pattern), windows, progress=False)
    layers = find_decoder_layers(model)
    n_linears = sum(len(find_linears(layer)) for layer in layers)
    assert len(report.layers) == n_linears > 0
    for layer in layers:
        for lin in find_linears(layer).values():
            w = linear_weight(lin)
            if pattern is not None:
                n, m = pattern
                groups = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
                assert (groups >= n).all()
            elif method == "wanda":
                assert (_zeros_per_row(w) >= w.shape[1] // 2).all()
            elif method == "sparsegpt":  # exact count per block of 128 columns (here: the whole matrix)
                assert int((w == 0).sum()) >= w.numel() // 2
            else:
                assert int((w == 0).sum()) >= w.numel() // 2
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    # embeddings and LM head untouched
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert torch.isfinite(model(random_windows(1, 16)).logits).all()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_each_layer_is_calibrated_on_pruned_predecessors(arch):
    """The statistics of layer i must come from the outputs of the already-pruned layers < i.

    After pruning, a plain forward of the pruned model feeds every layer the same inputs as the sequential
    pass did; the first linear called in each layer reads only those inputs, so its statistics must match.
    """
    model = tiny_model(arch, layers=3)
    windows = random_windows(4, 24)
    seen = {}
    prune_model(model, PruneSpec("wanda", 0.5), windows, progress=False,
                on_layer=lambda i, stats: seen.__setitem__(i, stats))
    layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        linears = find_linears(layer)
        full = capture_layer_inputs(model, layers, windows)
        for j in range(i):
            full.hidden = run_layer(layers[j], full)
        order = []
        hooks = [lin.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
                 for name, lin in linears.items()]
        ref = collect_input_stats(layer, linears, full)
        for h in hooks:
            h.remove()
        first = order[0]
        torch.testing.assert_close(seen[i][first].sq_norm, ref[first].sq_norm, rtol=1e-5, atol=1e-6)
        assert seen[i][first].tokens == windows.numel()


def test_dense_stats_differ_from_sequential():
    """Guard for the test above: without re-running pruned layers the layer-1 statistics would differ."""
    model = tiny_model("llama", layers=2)
    windows = random_windows(4, 24)
    layers = find_decoder_layers(model)
    dense = capture_layer_inputs(model, layers, windows)
    dense.hidden = run_layer(layers[0], dense)
    lin = find_linears(layers[1])["self_attn.q_proj"]
    dense_stats = collect_input_stats(layers[1], {"q": lin}, dense)["q"]
    seen = {}
    prune_model(model, PruneSpec("wanda", 0.5), windows, progress=False,
                on_layer=lambda i, stats: seen.__setitem__(i, stats))
    assert not torch.allclose(seen[1]["self_attn.q_proj"].sq_norm, dense_stats.sq_norm, rtol=1e-3)


def test_nm_pattern_not_dividing_width_fails_before_pruning():
    model = tiny_model("llama", hidden=60)  # 60 % 8 != 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not divide in_features=60"):
        prune_model(model, PruneSpec("wanda", None, (4, 8)), random_windows(2, 16), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although pruning was refused"


def test_architecture_without_linear_layers():
    class NoLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.LayerNorm(8) for _ in range(2)])

    with pytest.raises(ValueError, match="no list of decoder layers holding linear layers"):
        prune_model(NoLinears(), PruneSpec("magnitude", 0.5), None, progress=False)


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model(tiny_model("llama"), PruneSpec("wanda", 0.5), None, progress=False)


def test_zero_sparsity_changes_nothing():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, PruneSpec("wanda", 0.0), random_windows(2, 16), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _SometimesShared(torch.nn.Module):
    """A and B read the same tensor in some windows, different ones in others."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Linear(4, 4, bias=False)
        self.B = torch.nn.Linear(4, 4, bias=False)

    def forward(self, h):
        return self.A(h) + self.B(h if h.flatten()[0] > 0 else 2 * h)


@pytest.mark.parametrize("first_shared", [True, False])
def test_groups_that_change_between_windows_raise(first_shared):
    from sparsekit.calibrate import LayerInputs, collect_input_stats

    block = _SometimesShared()
    h = torch.randn(3, 5, 4)
    h[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0]) * (1 if first_shared else -1)
    with pytest.raises(ValueError, match="read the very same input tensor in some calibration windows"):
        collect_input_stats(block, {"A": block.A, "B": block.B}, LayerInputs(h.clone(), [()] * 3, [{}] * 3))
    h[:, 0, 0] = 1.0  # shared in every window: one group
    st = collect_input_stats(block, {"A": block.A, "B": block.B}, LayerInputs(h.clone(), [()] * 3, [{}] * 3))
    assert st["A"] is st["B"] and st["A"].tokens == 15


def test_a_linear_no_token_reaches_is_named():
    from tiny_models import random_windows, tiny_model

    model = tiny_model("llama")
    block = model.model.layers[0]
    block.mlp.unused = torch.nn.Linear(8, 8)  # never called by the block's forward
    with pytest.raises(ValueError, match="decoder block 0: no calibration token reached mlp.unused"):
        prune_model(model, PruneSpec("wanda", 0.5), random_windows(2, 8), progress=False)


def test_calibration_runs_in_eval_mode_and_restores_the_mode():
    """A model left in train mode (from_config, or after fine-tuning) must not run dropout while calibrating:
    the masks would change from run to run."""
    from transformers import AutoModelForCausalLM

    from tiny_models import random_windows, tiny_config

    masks = []
    for run in range(2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))  # train mode, dropout 0.1
        assert model.training
        torch.manual_seed(100 + run)  # a different dropout draw each run
        prune_model(model, PruneSpec("wanda", 0.5), random_windows(4, 64), progress=False)
        assert model.training  # restored
        masks.append(torch.cat([(linear_weight(lin) == 0).flatten() for layer in find_decoder_layers(model)
                                for lin in find_linears(layer).values()]))
    assert torch.equal(masks[0], masks[1])


def test_owl_parameters_are_checked_up_front():
    with pytest.raises(ValueError, match=r"--owl-m\) must be a finite number > 0"):
        PruneSpec("wanda", 0.5, profile="owl", owl_m=float("nan"))
    with pytest.raises(ValueError, match=r"--owl-lambda\) must be in \[0, 1\)"):
        PruneSpec("wanda", 0.5, profile="owl", owl_lambda=-0.1)


def test_weights_outside_linear_layers_are_reported_as_left_dense():
    """Fused MoE experts (3-D parameters) are not linear layers: a warning names them instead of a report whose
    sparsity silently covers only part of the block."""
    from tiny_models import random_windows, tiny_model

    model = tiny_model("llama")
    model.model.layers[0].mlp.experts = torch.nn.Parameter(torch.randn(4, 8, 8))
    model.model.layers[1].mlp.experts = torch.nn.Parameter(torch.randn(4, 8, 8))
    with pytest.warns(UserWarning, match=r"not linear layers \(mlp.experts \(4, 8, 8\)"):
        prune_model(model, PruneSpec("magnitude", 0.5), random_windows(2, 8), progress=False)


def test_captured_masks_and_positions_are_kept_once():
    """Eager attention passes an L x L mask per window: equal ones are stored once (memory n * L^2 before)."""
    from tiny_models import random_windows, tiny_model

    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, random_windows(3, 16))
    tensors = [[v for v in kw.values() if isinstance(v, torch.Tensor)] for kw in inputs.kwargs]
    assert tensors[0], "expected tensor kwargs (mask / positions) for the eager model"
    for later in tensors[1:]:
        assert len(later) == len(tensors[0]) and all(a is b for a, b in zip(later, tensors[0]))
    pos = [kw.get("position_embeddings") for kw in inputs.kwargs]
    if pos[0] is not None:
        assert all(p[0] is pos[0][0] and p[1] is pos[0][1] for p in pos[1:])


def test_calibration_builds_no_autograd_graph():
    """capture_layer_inputs and collect_input_stats run under no_grad: with trainable weights, neither the
    captured activations nor the statistics may hold an autograd graph (memory would grow with every window)."""
    from tiny_models import random_windows, tiny_model

    model = tiny_model("llama")
    assert any(p.requires_grad for p in model.parameters())
    layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, random_windows(2, 8))
    assert not inputs.hidden.requires_grad
    stats = collect_input_stats(layers[0], find_linears(layers[0]), inputs, hessian=True)
    assert all(not st.sq_norm.requires_grad and not st.xtx.requires_grad for st in stats.values())
