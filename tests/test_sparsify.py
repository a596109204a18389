"""sparsify_ end to end: a tiny Llama pruned (magnitude, 2:4 and 50% unstructured), its linear layers swapped
for SparseLinear, generates the same greedy tokens as the masked dense model (eager and torch.compile
fullgraph, ~15 s each with a one-block model); the swap's report, its options and errors; save_compressed / load_compressed round trip.

The prompt has 12 tokens, so the prefill (12 rows) runs the fallback path and each decode step (1 row) the
sparse kernel (where the CPU has it): both paths feed the generated tokens.
"""

import pytest
import torch
from torch import nn

from sparsekit import load_compressed, save_compressed
from sparsekit.nn import SparseLinear
from sparsekit.nn.sparse_linear import cpu_sparse_kernels_fast
from sparsekit.prune import PruneSpec, prune_model
from sparsekit.sparsify import sparsify_
from tiny_models import tiny_model

SPECS = {"2:4": PruneSpec("magnitude", pattern=(2, 4)), "unstructured50": PruneSpec("magnitude", 0.5)}
NEW_TOKENS = 8


def pruned_llama(kind: str, layers: int = 2):
    model = tiny_model("llama", layers=layers)
    prune_model(model, SPECS[kind], progress=False)
    return model


def prompt(n: int = 12):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(3))


def greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, **kw)


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("fallback", ["unpack", "cache"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_generate_matches_masked_dense(kind, fallback):
    model = pruned_llama(kind)
    ids = prompt()
    want = greedy(model, ids)
    logits_before = model(ids).logits
    report = sparsify_(model, dense_fallback=fallback)

    layers = sparse_layers(model)
    assert len(layers) == len(report.layers) == 14  # 7 linears x 2 blocks; the LM head stays dense
    assert isinstance(model.lm_head, nn.Linear) and ("lm_head", "LM head (include_lm_head=True to swap it)") in \
        report.skipped
    assert {m.format for m in layers.values()} == {"2:4" if kind == "2:4" else "bitmap"}
    assert report.bytes_after < 0.6 * report.bytes_before
    assert (report.cache_bytes > 0) == (fallback == "cache")
    torch.testing.assert_close(model(ids).logits, logits_before, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, ids), want)


def test_generate_4_8_matches_masked_dense():
    """4:8 layers take the same kernels as 2:4 ones (the streamed ones at decode, 1 row; the fallback at prefill)."""
    model = tiny_model("llama", layers=2)
    prune_model(model, PruneSpec("magnitude", pattern=(4, 8)), progress=False)
    ids = prompt()
    want = greedy(model, ids)
    sparsify_(model, format="4:8")
    layers = sparse_layers(model)
    assert len(layers) == 14 and {m.format for m in layers.values()} == {"4:8"}
    assert {m.path(1, torch.device("cpu"), torch.float32) for m in layers.values()} == {
        "sparse" if cpu_sparse_kernels_fast()[0] else "unpack"}
    assert torch.equal(greedy(model, ids), want)


@pytest.mark.parametrize("kind", list(SPECS))
def test_generate_compiled_fullgraph_matches_masked_dense(kind):
    torch._dynamo.reset()
    model = pruned_llama(kind, layers=1)
    ids = prompt()
    want = greedy(model, ids)
    sparsify_(model, dense_fallback="cache")
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    try:
        got = greedy(model, ids, cache_implementation="static")
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)


def test_report_and_table():
    model = pruned_llama("2:4")
    report = sparsify_(model)
    row = next(r for r in report.layers if r.name == "model.layers.0.mlp.down_proj")
    assert row.shape == (64, 128) and row.format == "2:4" and row.sparsity == 0.5
    assert row.bytes_before == 64 * 128 * 4 and row.bytes_after == 64 * 64 * 4 + 64 * 16
    d = report.to_dict()
    assert d["bytes_before"] == report.bytes_before and len(d["layers"]) == 14
    text = report.table()
    assert "model.layers.1.self_attn.q_proj" in text and "total (14 layers)" in text and "lm_head" in text


def test_filter_min_sparsity_and_lm_head():
    model = pruned_llama("unstructured50")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.normal_()  # dense again
        model.lm_head.weight.mul_(model.lm_head.weight.abs() > model.lm_head.weight.abs().median())
    report = sparsify_(model, filter_fn=lambda name, m: "self_attn.v_proj" not in name, include_lm_head=True)
    names = set(sparse_layers(model))
    assert "lm_head" in names
    assert "model.layers.0.mlp.up_proj" not in names and "model.layers.0.self_attn.v_proj" not in names
    reasons = dict(report.skipped)
    assert reasons["model.layers.1.self_attn.v_proj"] == "filter_fn"
    assert reasons["model.layers.0.mlp.up_proj"].startswith("sparsity 0.000 < min_sparsity 0.5")
    assert len(names) == 15 - 3  # 14 + lm_head, less two v_proj and the dense up_proj


def test_tied_weights_are_left_alone():
    model = pruned_llama("2:4")
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.mul_(model.lm_head.weight.abs() > model.lm_head.weight.abs().median())
    report = sparsify_(model, include_lm_head=True)
    assert dict(report.skipped)["lm_head"] == "weight shared with another module (tied)"
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_explicit_format_errors_leave_model_untouched():
    model = pruned_llama("unstructured50")
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj': weight is not 2:4 sparse"):
        sparsify_(model, format="2:4")
    assert not sparse_layers(model)
    with pytest.raises(ValueError, match="min_sparsity must be in"):
        sparsify_(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="format must be"):
        sparsify_(model, format="dense")
    report = sparsify_(model, format="bitmap")
    assert {r.format for r in report.layers} == {"bitmap"}


def test_unpruned_model_swaps_nothing():
    model = tiny_model("llama")
    report = sparsify_(model)
    assert not report.layers and not sparse_layers(model) and len(report.skipped) == 15


def test_gpt2_conv1d_layers():
    model = tiny_model("gpt2")
    prune_model(model, PruneSpec("magnitude", pattern=(2, 4)), progress=False)
    ids = prompt()
    with torch.no_grad():
        want = model(ids).logits
    report = sparsify_(model)
    assert len(report.layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fallback", ["unpack", "cache"])
def test_save_compressed_round_trip(tmp_path, fallback):
    model = pruned_llama("unstructured50")
    sparsify_(model, format="auto", dense_fallback=fallback)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj = SparseLinear.from_linear(  # one 2:4 layer among bitmaps
            _two_four_linear(64, 64), "2:4", dense_fallback=fallback)
    ids = prompt()
    save_compressed(model, str(tmp_path / "ckpt"))
    loaded = load_compressed(str(tmp_path / "ckpt"), attn_implementation="eager")
    before, after = sparse_layers(model), sparse_layers(loaded)
    assert before.keys() == after.keys()
    for name, layer in after.items():
        assert layer.format == before[name].format and layer.dense_fallback == fallback
        for key, t in before[name].state_dict().items():
            assert torch.equal(layer.state_dict()[key], t), (name, key)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def _two_four_linear(in_f, out_f):
    from sparsekit import ops

    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.mul_(ops.nm_mask(lin.weight.abs(), 2, 4))
    return lin


# ----------------------------------------------------------------------------------------------------
# sparsekit bench (sparsekit/cli_bench.py)
# ----------------------------------------------------------------------------------------------------
def _bench_parser():
    import argparse

    from sparsekit import cli_bench

    parser = argparse.ArgumentParser(prog="sparsekit")
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_timed_generate_reuses_one_static_cache():
    # transformers builds a fresh StaticCache (new addresses) per generate(); CUDA graphs would re-record in every
    # timed decode. The benchmarks keep one per model: same addresses on every call, same tokens.
    from sparsekit.cli_bench import _timed_generate, static_cache
    from tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    cache = static_cache(model, ids, 6)
    first = _timed_generate(model, ids, 6, True, cache)[2]
    addresses = [layer.keys.data_ptr() for layer in cache.layers]
    second = _timed_generate(model, ids, 6, True, cache)[2]
    assert [layer.keys.data_ptr() for layer in cache.layers] == addresses
    assert torch.equal(first, second)  # the reset cleared the first call's keys and positions
    assert torch.equal(first, _timed_generate(model, ids, 6, True)[2])  # a fresh cache per call
    assert torch.equal(first, _timed_generate(model, ids, 6, False)[2])  # the dynamic cache


def test_bench_cli_on_a_pruned_folder(tmp_path, capsys):
    import json

    from sparsekit import cli_bench
    from tiny_models import WORDS, save_tiny_hf_folder
    from transformers import AutoModelForCausalLM

    folder = save_tiny_hf_folder(str(tmp_path / "tiny"), open(WORDS).read()[:20000])
    unpruned = _bench_parser().parse_args(["bench", "--model", folder, "--new-tokens", "3", "--repeats", "1",
                                           "--no-progress"])
    assert cli_bench.run(unpruned) == 2
    assert "prune it first" in capsys.readouterr().err

    model = AutoModelForCausalLM.from_pretrained(folder)
    prune_model(model, SPECS["2:4"], progress=False)
    model.save_pretrained(folder)
    args = _bench_parser().parse_args(["bench", "--model", folder, "--new-tokens", "4", "--prompt-tokens", "6",
                                       "--repeats", "1", "--batch", "2", "--output", str(tmp_path / "b.json")])
    assert cli_bench.run(args) == 0
    captured = capsys.readouterr()
    assert "[4/4] round 1/1" in captured.err and "swapped 14 linear layers (2:4)" in captured.err
    assert "decode tokens/s" in captured.out and "same tokens" in captured.out
    out = json.load(open(tmp_path / "b.json"))
    assert out["same_tokens"] is True and out["formats"] == ["2:4"] and out["batch"] == 2
    assert out["results"]["sparse"]["decode_tokens_per_s"] > 0
    assert len(out["sparsify"]["layers"]) == 14
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # written through a temporary file
    # checked before minutes of timing: an --output folder that does not exist, and more tokens than positions
    nowhere = _bench_parser().parse_args(["bench", "--model", folder, "--output", str(tmp_path / "no" / "b.json")])
    assert cli_bench.run(nowhere) == 2
    assert "does not exist or cannot be written" in capsys.readouterr().err
    from sparsekit.cli import main

    assert main(["bench", "--model", folder, "--prompt-tokens", "200", "--new-tokens", "100", "--no-progress"]) == 2
    assert "--prompt-tokens + --new-tokens 300 is longer than the model's 256 positions" in capsys.readouterr().err


def test_bench_help_teaches(capsys):
    with pytest.raises(SystemExit):
        _bench_parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    assert "decode tokens/s = batch * (new_tokens - 1)" in text and "sparsekit prune" in text
    assert "--dense-fallback" in text and "--new-tokens" in text


def test_load_compressed_keeps_per_tensor_dtypes_and_reties_shared_weights(tmp_path):
    """A float32 head and a float32 SparseLinear in a bfloat16 model come back float32 and exact; a weight
    shared by two layers comes back as one Parameter (the manifest's tied map), not two copies."""
    model = tiny_model("llama", layers=2).bfloat16()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod is not model.lm_head:
                mod.weight.mul_((torch.rand_like(mod.weight, dtype=torch.float32) < 0.4).to(mod.weight.dtype))
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    model.lm_head.float()
    sparsify_(model, filter_fn=lambda name, mod: "down_proj" in name, format="bitmap")
    model.model.layers[0].mlp.down_proj.float()
    save_compressed(model, str(tmp_path / "ck"))
    back = load_compressed(str(tmp_path / "ck"))
    assert back.lm_head.weight.dtype == torch.float32 and torch.equal(back.lm_head.weight, model.lm_head.weight)
    down = back.model.layers[0].mlp.down_proj
    assert isinstance(down, SparseLinear) and down.values.dtype == torch.float32
    assert torch.equal(down.values, model.model.layers[0].mlp.down_proj.values)
    assert back.model.layers[1].mlp.down_proj.values.dtype == torch.bfloat16
    assert back.model.layers[1].mlp.up_proj.weight is back.model.layers[0].mlp.up_proj.weight


def test_load_compressed_rejects_a_bad_dtype_before_reading(tmp_path):
    """A dtype load_compressed cannot give is refused up front, naming the accepted ones (not a KeyError, and not
    after the whole model was built)."""
    for bad, message in (("float64", "dtype must be one of float32, bfloat16, float16"),
                         ("fp16", "dtype must be one of"),
                         (torch.float64, "dtype must be float32, bfloat16 or float16")):
        with pytest.raises(ValueError, match=message):
            load_compressed(str(tmp_path / "no-such-folder"), dtype=bad)
