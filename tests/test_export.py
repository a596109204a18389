"""compressed-tensors export: the on-disk layout pinned by hand-worked tensors, and (when the package is
installed) loading the folder with compressed-tensors' own decompressor gives back the exact dense weights
and the same model outputs.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsekit.export import export_compressed_tensors
from sparsekit.prune import PruneSpec, prune_model
from sparsekit.sparsify import sparsify_
from tiny_models import tiny_model

SPECS = {"2:4": PruneSpec("magnitude", pattern=(2, 4)), "unstructured50": PruneSpec("magnitude", 0.5)}


def pruned_llama(kind):
    model = tiny_model("llama")
    prune_model(model, SPECS[kind], progress=False)
    return model


def test_layout_hand_worked(tmp_path):
    model = pruned_llama("2:4")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight.zero_()
        # row 0: groups [0, 1, 0, 2] [3, 0, 0, 0]; row 1: [0, 0, 4, 5] [6, 0, 7, 0]; the rest of the row is zero
        q.weight[0, :8] = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0])
        q.weight[1, :8] = torch.tensor([0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 7.0, 0.0])
    export_compressed_tensors(model, str(tmp_path / "ct24"))
    t = load_file(str(tmp_path / "ct24" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert f"{name}.weight" not in t
    assert t[f"{name}.shape"].tolist() == [[64], [64]]
    # two slots per group: the non-zeros, then the group's lowest zero positions
    assert t[f"{name}.compressed"].shape == (64, 32)
    assert t[f"{name}.compressed"][0, :4].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert t[f"{name}.compressed"][1, :4].tolist() == [4.0, 5.0, 6.0, 7.0]
    # kept columns row 0: 1, 3, 4, 5 -> bits 1+3+4+5 of byte 0; row 1: 2, 3, 4, 6
    assert t[f"{name}.bitmask"].dtype == torch.uint8 and t[f"{name}.bitmask"].shape == (64, 8)
    assert t[f"{name}.bitmask"][0, 0].item() == 2 + 8 + 16 + 32
    assert t[f"{name}.bitmask"][1, 0].item() == 4 + 8 + 16 + 64
    assert (t[f"{name}.bitmask"].to(torch.int32).bitwise_and(0x0F) != 0).all()  # every group has 2 bits

    export_compressed_tensors(model, str(tmp_path / "ctbm"), format="sparse-bitmask")
    t = load_file(str(tmp_path / "ctbm" / "model.safetensors"))
    assert t[f"{name}.shape"].tolist() == [64, 64]
    assert t[f"{name}.compressed"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert t[f"{name}.bitmask"][0, 0].item() == 2 + 8 + 16 and t[f"{name}.bitmask"][1, 0].item() == 4 + 8 + 16 + 64
    assert t[f"{name}.row_offsets"].tolist() == [0, 3] + [7] * 62
    assert "model.layers.0.mlp.up_proj.row_offsets" in t


@pytest.mark.parametrize("kind", list(SPECS))
def test_config(tmp_path, kind):
    model = pruned_llama(kind)
    summary = export_compressed_tensors(model, str(tmp_path / "ct"))
    cfg = json.load(open(tmp_path / "ct" / "config.json"))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    s = q["sparsity_config"]
    want = "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask"
    assert s["format"] == summary["format"] == want
    assert s["sparsity_structure"] == ("2:4" if kind == "2:4" else "unstructured")
    assert len(s["targets"]) == 14 and s["ignore"] == ["lm_head"]
    assert 0.2 < s["global_sparsity"] < 0.5


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj' is not 2:4 sparse"):
        export_compressed_tensors(pruned_llama("unstructured50"), str(tmp_path / "a"), format="sparse-24-bitmask")
    with pytest.raises(ValueError, match="format must be 'auto' or one of"):
        export_compressed_tensors(pruned_llama("2:4"), str(tmp_path / "b"), format="marlin-24")
    with pytest.raises(ValueError, match="no sparse linear layer to export"):
        export_compressed_tensors(tiny_model("llama"), str(tmp_path / "c"))
    for bad in (-1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"min_sparsity must be in \[0, 1\]"):
            export_compressed_tensors(pruned_llama("2:4"), str(tmp_path / "d"), min_sparsity=bad)
    assert not any((tmp_path / n).exists() for n in "acd")


@pytest.mark.parametrize("swapped", [False, True], ids=["masked", "sparsified"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_compressed_tensors_loads_identical_weights(tmp_path, kind, swapped):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor

    model = pruned_llama(kind)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    if swapped:
        sparsify_(model)
    path = str(tmp_path / "ct")
    export_compressed_tensors(model, path)

    compressor = ModelCompressor.from_pretrained(path)
    assert compressor.sparsity_config.format == ("sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask")
    got = dict(compressor.sparsity_compressor.decompress(path))
    assert got.keys() == dense_state.keys()
    for key, t in dense_state.items():
        assert torch.equal(got[key], t), key

    fresh = tiny_model("llama", seed=1)  # other random weights, all overwritten by the checkpoint
    compressor.decompress(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    assert ct.__version__  # the package that read it


def test_tied_embeddings_round_trip_with_tie_weights(tmp_path):
    """OPT ties its LM head to the embeddings: the tensor is written once (as save_pretrained does), and a model
    decompressed into, then re-tied as transformers' loader does, gives back every weight and the outputs."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor

    model = tiny_model("opt")
    prune_model(model, SPECS["2:4"], progress=False)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    path = str(tmp_path / "ct")
    export_compressed_tensors(model, path)
    fresh = tiny_model("opt", seed=1)
    ModelCompressor.from_pretrained(path).decompress(path, fresh)
    fresh.tie_weights()
    got = fresh.state_dict()
    for key, t in dense_state.items():
        assert torch.equal(got[key], t), key
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
