"""OWL per-block sparsities: the mapping from outlier ratios, and its use in pruning."""

import pytest
import torch

from sparsekit.models import find_decoder_layers, find_linears, linear_weight
from sparsekit.owl import outlier_ratios, owl_sparsities
from sparsekit.prune import PruneSpec, prune_model
from tiny_models import random_windows, tiny_model


def test_mapping_hand_worked():
    # ratios rescaled to [0, 2*lam] = [0, 0.1, 0.2], mean 0.1 -> densities [0.4, 0.5, 0.6]
    got = owl_sparsities([0.01, 0.02, 0.03], target=0.5, lam=0.1)
    assert got == pytest.approx([0.6, 0.5, 0.4])


def test_mapping_mean_bounds_and_order():
    g = torch.Generator().manual_seed(0)
    ratios = torch.rand(30, generator=g).tolist()
    s = owl_sparsities(ratios, target=0.7, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # span 2 * lam (not centred on the target in general)
    order = sorted(range(30), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers, lower sparsity


def test_equal_ratios_give_uniform():
    assert owl_sparsities([0.1, 0.1], target=0.5, lam=0.08) == pytest.approx([0.5, 0.5])


def test_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        owl_sparsities([0.0, 1.0], target=0.95, lam=0.1)


def test_owl_rejects_nm():
    with pytest.raises(ValueError, match="N:M pattern fixes it"):
        PruneSpec("wanda", None, (2, 4), profile="owl")


def test_outlier_ratio_definition():
    model = tiny_model("llama", layers=2)
    windows = random_windows(2, 16)
    ratios = outlier_ratios(model, find_decoder_layers(model), windows, m=2.0)
    assert len(ratios) == 2 and all(0 < r < 0.5 for r in ratios)
    assert outlier_ratios(model, find_decoder_layers(model), windows, m=1e9) == [0.0, 0.0]


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_prune_with_owl_profile(method):
    model = tiny_model("llama", layers=4)
    report = prune_model(model, PruneSpec(method, 0.6, profile="owl", owl_m=2.0, owl_lambda=0.1),
                         random_windows(4, 24), progress=False)
    assert len(report.block_sparsities) == 4 and len(report.outlier_ratios) == 4
    assert sum(report.block_sparsities) / 4 == pytest.approx(0.6)
    assert max(report.block_sparsities) - min(report.block_sparsities) == pytest.approx(0.2)
    for i, layer in enumerate(find_decoder_layers(model)):
        ws = [linear_weight(lin) for lin in find_linears(layer).values()]
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        assert zeros == pytest.approx(report.block_sparsities[i], abs=0.02)
