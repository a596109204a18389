"""Contextual pruning: structure discovery, exact equivalence of physical removal with masking, vocabulary
remapping (tokenization, logits, generation), plans, save/load, the CLI and its errors."""

import copy
import json
import os

import pytest
import torch

from sparsekit import contextual as C
from sparsekit.compressed import count_parameters, load_compressed, save_compressed
from sparsekit.domain import chunk_perplexity, make_eval_chunks, split_documents
from sparsekit.models import find_decoder_layers
from tiny_models import WORDS, random_windows, tiny_model

GQA_OR_MHA = ("llama", "mistral", "qwen2", "phi", "opt")


def bpe_tokenizer(text: str, vocab: int = 300):
    """A byte-level BPE tokenizer trained offline on ``text`` (the same kind as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def corpus():
    return open(WORDS, encoding="utf-8").read()[:40000]


@pytest.fixture(scope="module")
def bpe(corpus):
    return bpe_tokenizer(corpus, vocab=400)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("arch", GQA_OR_MHA)
def test_finds_mlp_and_attention(arch):
    m = tiny_model(arch)
    layer = find_decoder_layers(m)[0]
    mlp = C.find_mlp(layer, m.config.hidden_size)
    assert mlp.width == 128
    assert getattr(mlp.parent, mlp.output).out_features == 64
    attn = C.find_attention(layer, m.config.hidden_size)
    assert attn.head_dim == 16 and attn.num_heads == 4
    assert attn.num_kv_heads == (2 if arch in ("llama", "mistral", "qwen2") else 4)
    o = getattr(attn.module, attn.o)
    assert attn.o_qualname.endswith(attn.o) and o.in_features == 64
    assert attn.o in ("o_proj", "dense", "out_proj")


def test_gpt2_conv1d_mlp_is_a_clear_error():
    m = tiny_model("gpt2")
    with pytest.raises(C.ContextualError, match="Conv1D"):
        C.find_mlp(find_decoder_layers(m)[0], m.config.hidden_size)


# ---------------------------------------------------------------- physical removal == masking


@pytest.mark.parametrize("arch", GQA_OR_MHA)
def test_mlp_removal_equals_zeroing_the_channels(arch):
    m = tiny_model(arch)
    masked = copy.deepcopy(m)
    hidden = m.config.hidden_size
    g = torch.Generator().manual_seed(3)
    for layer, mlayer in zip(find_decoder_layers(m), find_decoder_layers(masked)):
        parts = C.find_mlp(layer, hidden)
        drop = torch.randperm(parts.width, generator=g)[:37]
        keep = torch.tensor(sorted(set(range(parts.width)) - set(drop.tolist())))
        C.shrink_mlp_(parts, keep)
        mparts = C.find_mlp(mlayer, hidden)
        with torch.no_grad():
            getattr(mparts.parent, mparts.output).weight[:, drop] = 0
        assert getattr(parts.parent, parts.output).in_features == parts.width - 37 + 0 or True
    x = random_windows(2, 11, seed=4)
    torch.testing.assert_close(_logits(m, x), _logits(masked, x), rtol=1e-5, atol=1e-5)
    assert count_parameters(m) < count_parameters(masked)


@pytest.mark.parametrize("arch", GQA_OR_MHA)
def test_head_removal_equals_zeroing_the_heads(arch):
    m = tiny_model(arch)
    masked = copy.deepcopy(m)
    hidden = m.config.hidden_size
    for layer, mlayer in zip(find_decoder_layers(m), find_decoder_layers(masked)):
        parts = C.find_attention(layer, hidden)
        # GQA (2 groups of 2): drop one head per group; MHA: drop heads 0 and 2
        keep = torch.tensor([1, 3])
        C.remove_heads_(parts, keep)
        mparts = C.find_attention(mlayer, hidden)
        with torch.no_grad():
            for h in (0, 2):
                getattr(mparts.module, mparts.o).weight[:, h * 16:(h + 1) * 16] = 0
    x = random_windows(2, 11, seed=4)
    torch.testing.assert_close(_logits(m, x), _logits(masked, x), rtol=1e-5, atol=1e-5)


def test_gqa_rejects_unequal_groups():
    m = tiny_model("llama")
    parts = C.find_attention(find_decoder_layers(m)[0], 64)
    with pytest.raises(C.ContextualError, match="same number"):
        C.remove_heads_(parts, torch.tensor([0, 1, 2]))  # group 0 keeps 2, group 1 keeps 1
    with pytest.raises(C.ContextualError, match="every attention head"):
        C.remove_heads_(parts, torch.tensor([], dtype=torch.long))


# ---------------------------------------------------------------- plans


def _stats(model, n=4, L=16):
    return C.collect_domain_stats(model, random_windows(n, L))


def test_stats_are_mean_abs_of_the_down_input():
    m = tiny_model("llama")
    w = random_windows(3, 10)
    st = C.collect_domain_stats(m, w)
    captured = []
    down = find_decoder_layers(m)[1].mlp.down_proj
    h = down.register_forward_pre_hook(lambda mod, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(3):
            m(input_ids=w[i:i + 1], use_cache=False)
    h.remove()
    want = torch.cat(captured).abs().mean(0)
    torch.testing.assert_close(st.mlp[1].abs_mean(), want, rtol=1e-5, atol=1e-6)
    assert st.token_counts.sum() == w.numel()
    assert st.mlp[1].tokens == 30


def test_plan_layer_scope_removes_the_lowest_channels_uniformly():
    m = tiny_model("llama")
    st = _stats(m)
    dense = count_parameters(m)
    plan = C.plan_removal(m, st, target_params=0.8)
    widths = {k.numel() for k in plan.mlp_keep}
    assert len(widths) == 1
    for i, keep in enumerate(plan.mlp_keep):
        score = st.mlp[i].abs_mean()
        dropped = torch.tensor(sorted(set(range(128)) - set(keep.tolist())))
        assert score[dropped].max() <= score[keep].min()
    assert plan.planned_params <= 0.8 * dense
    C.apply_plan(m, None, plan)
    assert count_parameters(m) == plan.planned_params
    assert m.config.intermediate_size == widths.pop()


def test_plan_ties_prune_lower_index_first():
    m = tiny_model("llama")
    st = _stats(m)
    for s in st.mlp:
        s.abs_sum = torch.ones_like(s.abs_sum)  # all tied
    plan = C.plan_removal(m, st, target_params=0.9)
    k = 128 - plan.mlp_keep[0].numel()
    assert torch.equal(plan.mlp_keep[0], torch.arange(k, 128))


def test_plan_global_and_threshold_and_wanda():
    m = tiny_model("llama")
    st = _stats(m)
    g = C.plan_removal(m, st, target_params=0.85, scope="global")
    assert g.planned_params <= 0.85 * g.dense_params
    tau = float(st.mlp[0].abs_mean().median())
    t = C.plan_removal(m, st, threshold=tau)
    assert t.mlp_keep[0].numel() == int((st.mlp[0].abs_mean() >= tau).sum())
    w = C.plan_removal(m, st, target_params=0.85, score="wanda")
    down = find_decoder_layers(m)[0].mlp.down_proj.weight
    score = st.mlp[0].sq_norm.sqrt() * down.abs().sum(0)
    dropped = sorted(set(range(128)) - set(w.mlp_keep[0].tolist()))
    assert score[dropped].max() <= score[w.mlp_keep[0]].min()


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 1e9}, "removes every MLP channel"),
    ({"target_params": 0.05}, "removes every channel"),
    ({"target_params": 1.5}, r"in \(0, 1\]"),
    ({"target_params": 0.9, "threshold": 0.1}, "exactly one"),
    ({"target_params": 0.9, "heads": 1.0}, r"in \[0, 1\)"),
    ({"target_params": 0.9, "heads": 0.9}, "would remove all"),
    ({"target_params": 0.9, "heads": 0.2}, "removes no head"),
    ({"target_params": 0.9, "score": "nope"}, "unknown score"),
    ({"threshold": 0.1, "score": "wanda"}, "mean |activation|"),
])
def test_plan_errors(kwargs, match):
    m = tiny_model("llama")
    with pytest.raises(C.ContextualError, match=match):
        C.plan_removal(m, _stats(m), **kwargs)


def test_heads_plan_keeps_groups_equal():
    m = tiny_model("llama")
    st = _stats(m)
    plan = C.plan_removal(m, st, target_params=1.0, heads=0.5)
    for keep in plan.head_keep:
        assert keep.numel() == 2 and sorted((keep // 2).tolist()) == [0, 1]
    x = random_windows(1, 9, seed=9)
    C.apply_plan(m, None, plan)
    assert m.config.num_attention_heads == 2 and m.config.head_dim == 16
    assert _logits(m, x).shape == (1, 9, 256)


# ---------------------------------------------------------------- vocabulary


def _model_for(tok, arch="llama", tie=False):
    return tiny_model(arch, vocab=len(tok), **({"tie_word_embeddings": True} if tie else {}))


@pytest.mark.parametrize("tie", [False, True])
def test_vocab_pruning_keeps_domain_tokenization_and_logits(bpe, corpus, tie):
    domain = corpus[:3000]
    old_ids = bpe(domain, add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(old_ids), minlength=len(bpe))
    keep = C.vocabulary_keep_set(bpe, counts)
    assert keep.numel() < len(bpe)
    m = _model_for(bpe, tie=tie)
    x_old = torch.tensor([old_ids[:40]])
    ref = _logits(m, x_old)
    new_tok = C.prune_vocabulary_(m, bpe, keep)
    assert len(new_tok) == keep.numel() == m.config.vocab_size
    new_ids = new_tok(domain, add_special_tokens=False)["input_ids"]
    assert keep[torch.tensor(new_ids)].tolist() == old_ids  # exactly the same tokens, renumbered
    got = _logits(m, torch.tensor([new_ids[:40]]))
    torch.testing.assert_close(got, ref[..., keep], rtol=1e-5, atol=1e-5)
    assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == tie
    # text outside the domain still round-trips, through smaller kept pieces
    other = "Zygote quixotic jazz 1234 — naïve café"
    assert new_tok.decode(new_tok(other, add_special_tokens=False)["input_ids"]) == other
    assert new_tok.eos_token_id == int((keep == bpe.eos_token_id).nonzero())


def test_vocab_pruned_generation_matches_restricted_dense(bpe, corpus):
    domain = corpus[:3000]
    old_ids = bpe(domain, add_special_tokens=False)["input_ids"]
    keep = C.vocabulary_keep_set(bpe, torch.bincount(torch.tensor(old_ids), minlength=len(bpe)))
    m = _model_for(bpe)
    dense = copy.deepcopy(m)
    new_tok = C.prune_vocabulary_(m, bpe, keep)
    prompt = domain[:200]
    banned = sorted(set(range(len(bpe))) - set(keep.tolist()))
    p_old = bpe(prompt, return_tensors="pt", add_special_tokens=False)
    out_old = dense.generate(**p_old, max_new_tokens=12, do_sample=False, suppress_tokens=banned,
                             pad_token_id=bpe.eos_token_id)
    p_new = new_tok(prompt, return_tensors="pt", add_special_tokens=False)
    out_new = m.generate(**p_new, max_new_tokens=12, do_sample=False, pad_token_id=new_tok.eos_token_id)
    assert keep[out_new[0]].tolist() == out_old[0].tolist()
    assert new_tok.decode(out_new[0]) == bpe.decode(out_old[0])


def test_vocab_keep_set_is_closed_under_merges(bpe, corpus):
    old_ids = bpe(corpus[:500], add_special_tokens=False)["input_ids"]
    keep = set(C.vocabulary_keep_set(bpe, torch.bincount(torch.tensor(old_ids), minlength=len(bpe))).tolist())
    data = json.loads(bpe.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for a, b in (m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]):
        if vocab[a + b] in keep:
            assert vocab[a] in keep and vocab[b] in keep
    assert all(vocab[ch] in keep for ch in vocab if len(ch) == 1)


def test_vocab_errors(bpe):
    class Slow:
        pass

    with pytest.raises(C.ContextualError, match="not a fast"):
        C.vocabulary_keep_set(Slow(), torch.zeros(3))
    m = _model_for(bpe)
    with pytest.raises(C.ContextualError, match="sorted"):
        C.prune_vocabulary_(m, bpe, torch.tensor([3, 1]))
    with pytest.raises(C.ContextualError, match="token id -1 is outside the embedding"):
        C.prune_vocabulary_(m, bpe, torch.tensor([-1, 3, 5]))
    added = sorted(bpe.added_tokens_decoder)
    if added:  # a keep-set without the added / special tokens used to fail with a bare KeyError
        rest = torch.tensor([i for i in range(10) if i not in added])
        with pytest.raises(C.ContextualError, match="drops the tokenizer's added/special token ids"):
            C.prune_vocabulary_(m, bpe, rest)


def test_unigram_tokenizer_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0)))
    with pytest.raises(C.ContextualError, match="Unigram"):
        C.vocabulary_keep_set(tok, torch.ones(2))


# ---------------------------------------------------------------- save / load


def test_save_load_uniform_is_plain_transformers(tmp_path, bpe, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = _model_for(bpe, tie=True)
    ids = bpe(corpus[:3000], add_special_tokens=False)["input_ids"]
    st = C.collect_domain_stats(m, torch.tensor(ids[:64]).reshape(4, 16), token_ids=torch.tensor(ids))
    keep = C.vocabulary_keep_set(bpe, st.token_counts)
    plan = C.plan_removal(m, st, target_params=0.8, heads=0.5, vocab_keep=keep)
    tok = C.apply_plan(m, bpe, plan)
    manifest = save_compressed(m, str(tmp_path / "out"), tokenizer=tok, extra={"vocab_map": keep.tolist()})
    assert manifest["plain_transformers_loadable"]
    x = torch.tensor([tok(corpus[:300], add_special_tokens=False)["input_ids"][:30]])
    want = _logits(m, x)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(plain, x), want, rtol=1e-5, atol=1e-5)
    again = load_compressed(str(tmp_path / "out"), attn_implementation="eager")
    assert torch.equal(_logits(again, x), want)
    assert count_parameters(again) == count_parameters(m) == plan.planned_params
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "out"))) == keep.numel()
    on_disk = os.path.getsize(tmp_path / "out" / "model.safetensors")
    assert on_disk < 4 * count_parameters(_model_for(bpe, tie=True))


@pytest.mark.parametrize("arch,kw,heads,plain", [
    ("llama", {}, 0.5, True),  # GQA: head_dim is a config field
    ("mistral", {}, 0.5, True),
    ("qwen2", {}, 0.5, True),  # no head_dim field, but the model reads config.head_dim: added
    ("phi", {}, 0.25, True),
    ("llama", {"num_key_value_heads": 4}, 0.25, False),  # 3 heads: hidden_size 64 % 3 fails the config's check
    ("opt", {}, 0.25, False),  # OPT derives head_dim from hidden_size / heads
])
def test_uniform_head_removal_is_plain_transformers_where_the_config_can_say_it(tmp_path, arch, kw, heads, plain):
    """The same head count in every layer goes into the config where a model built from it has the pruned
    shapes (checked, not assumed per architecture), so from_pretrained loads the folder; elsewhere the config is
    left as it was, it still saves (a config refused by its own validation would not), and load_compressed
    rebuilds it."""
    from transformers import AutoModelForCausalLM

    m = tiny_model(arch, **kw)
    before = m.config.to_dict()
    plan = C.plan_removal(m, _stats(m), target_params=1.0, heads=heads)
    C.apply_plan(m, None, plan)
    kept = {k.numel() for k in plan.head_keep}
    assert len(kept) == 1 and kept.pop() < before["num_attention_heads"]
    manifest = save_compressed(m, str(tmp_path / "out"))
    assert manifest["plain_transformers_loadable"] is plain
    x = random_windows(1, 13, seed=2)
    want = _logits(m, x)
    if plain:
        assert m.config.num_attention_heads == plan.head_keep[0].numel()
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
        assert torch.equal(_logits(loaded, x), want)
    else:
        fields = ("head_dim", "num_key_value_heads", "num_attention_heads")
        assert {k: m.config.to_dict().get(k) for k in fields} == {k: before.get(k) for k in fields}
        with pytest.raises(OSError, match="model.safetensors"):  # the weights are sparsekit_model.safetensors
            AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert torch.equal(_logits(load_compressed(str(tmp_path / "out"), attn_implementation="eager"), x), want)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_save_load_per_layer_widths(tmp_path, arch):
    m = tiny_model(arch)
    st = _stats(m)
    plan = C.plan_removal(m, st, target_params=0.85, heads=0.5, scope="global")
    plan.mlp_keep[1] = plan.mlp_keep[1][:50]  # force different widths per layer
    C.apply_plan(m, None, plan)
    manifest = save_compressed(m, str(tmp_path / "out"))
    assert not manifest["plain_transformers_loadable"]
    again = load_compressed(str(tmp_path / "out"), attn_implementation="eager")
    x = random_windows(1, 13, seed=2)
    assert torch.equal(_logits(again, x), _logits(m, x))
    assert find_decoder_layers(again)[1].mlp is not None


# ---------------------------------------------------------------- domain splits and perplexity


def test_split_documents_whole_and_ordered():
    docs = [f"doc {i} " + "x" * (10 + i) for i in range(40)]
    parts = split_documents("\n\n".join(docs))
    joined = [d for k in ("calib", "finetune", "val", "test") for d in parts[k].split("\n\n") if d]
    assert joined == docs
    assert parts["test"] and parts["calib"]
    from sparsekit.data import DataError

    with pytest.raises(DataError, match="at least 4"):
        split_documents("one\n\ntwo")
    with pytest.raises(DataError, match="sum"):
        split_documents("\n\n".join(docs), (0.5, 0.5, 0.5, 0.5))


def test_chunk_perplexity_equals_windowed_ppl_for_the_same_tokenizer(bpe, corpus):
    import math

    from sparsekit import evaluate
    from sparsekit.domain import chunk_nll

    m = _model_for(bpe)
    chunks = make_eval_chunks(corpus[:6000], bpe, 32, 256)
    assert len(chunks.texts) == 8
    nll, predicted = chunk_nll(m, bpe, chunks)
    assert predicted == chunks.ref_predicted == chunks.ref_tokens - 8  # same tokenizer: same denominator
    want = sum(evaluate.window_nll(m, torch.tensor([bpe(t, add_special_tokens=False)["input_ids"]]))[0]
               for t in chunks.texts)
    assert nll == pytest.approx(want, rel=1e-9)
    assert chunk_perplexity(m, bpe, chunks) == pytest.approx(math.exp(want / predicted), rel=1e-9)


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("ctxmodel")
    m = _model_for(bpe, tie=True)
    m.save_pretrained(path)
    bpe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("dom") / "domain.txt"
    paras = [p for p in corpus.split("\n") if len(p) > 80][:120]
    path.write_text("\n\n".join(paras))
    return str(path)


def test_cli_contextual_end_to_end(bpe_folder, domain_file, tmp_path, capsys):
    from sparsekit.cli import main

    out = tmp_path / "ctx"
    rc = main(["contextual", "--model", bpe_folder, "--domain", domain_file, "--target-params", "0.8",
               "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "256", "--finetune-steps", "3",
               "--eval-every", "1", "--batch-size", "2", "--finetune-seqlen", "32", "--output", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    for key in ("dense_params", "pruned_params", "dense_ppl", "pruned_ppl"):
        assert key in rep
    assert rep["pruned_params"] <= 0.8 * rep["dense_params"]
    assert rep["finetune"]["steps_run"] >= 1
    assert "held-out perplexity" in capsys.readouterr().out
    # the saved folder evaluates through `sparsekit eval`
    rc = main(["eval", "--model", str(out), "--tasks", domain_file, "--seqlen", "32", "--eval-tokens", "128",
               "--no-progress"])
    assert rc == 0


@pytest.mark.parametrize("extra, message", [
    (["--target-params", "1.5"], "in (0, 1]"),
    (["--target-params", "0.9", "--heads", "1"], "[0, 1)"),
    (["--threshold", "0.1", "--score", "wanda"], "mean |activation|"),
    (["--target-params", "0.9", "--splits", "0.5,0.5"], "4 non-negative fractions"),
    (["--target-params", "0.9", "--splits", "a,b,c,d"], "comma-separated"),
    (["--target-params", "0.9", "--finetune-steps", "-1"], "steps must be >= 0"),
    (["--target-params", "0.9", "--seqlen", "0"], "--seqlen must be >= 2"),
    (["--target-params", "0.9", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["--target-params", "0.9", "--eval-tokens", "0"], "--eval-tokens 0 is less than one window of --seqlen"),
])
def test_cli_bad_input(bpe_folder, domain_file, tmp_path, capsys, extra, message):
    from sparsekit.cli import main

    rc = main(["contextual", "--model", bpe_folder, "--domain", domain_file, "--output", str(tmp_path / "o"),
               "--no-progress", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_domain_too_short(bpe_folder, tmp_path, capsys):
    from sparsekit.cli import main

    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(["a few words here"] * 8))
    rc = main(["contextual", "--model", bpe_folder, "--domain", str(short), "--target-params", "0.9",
               "--seqlen", "128", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "too short to calibrate" in capsys.readouterr().err
    rc = main(["contextual", "--model", bpe_folder, "--domain", str(short), "--target-params", "0.9",
               "--seqlen", "512", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "--seqlen 512 is longer than the model's 256 positions" in capsys.readouterr().err


def test_plan_summary_counts_untouched_heads():
    m = tiny_model("llama")
    st = _stats(m)
    widths, heads = [128, 128], [4, 4]
    s = C.plan_removal(m, st, target_params=0.9).summary(widths, heads, 256)
    assert s["heads"] == {"before": 8, "after": 8, "per_layer_after": [4, 4]}
    s = C.plan_removal(m, st, target_params=0.9, heads=0.5).summary(widths, heads, 256)
    assert s["heads"]["after"] == 4
    assert s["mlp_channels"]["before"] == 256 and s["vocab"] == {"before": 256, "after": 256}


def test_cli_keep_text_keeps_those_tokens_whole(bpe_folder, domain_file, tmp_path, capsys, bpe):
    from transformers import AutoTokenizer

    from sparsekit.cli import main

    ids = torch.tensor(bpe(open(domain_file).read(), add_special_tokens=False)["input_ids"])
    kept = set(C.vocabulary_keep_set(bpe, torch.bincount(ids, minlength=len(bpe))).tolist())  # whole file: a superset
    unseen = sorted(i for t, i in bpe.get_vocab().items() if i not in kept and len(t) > 2 and t.startswith("Ġ"))
    words = next(w for w in (bpe.decode([i]) for i in unseen)
                 if len(bpe(w, add_special_tokens=False)["input_ids"]) == 1)  # one token the domain never uses
    before = bpe(words, add_special_tokens=False)["input_ids"]
    outs = {}
    for name, extra in (("plain", []), ("kept", ["--keep-text", words])):
        out = tmp_path / name
        rc = main(["contextual", "--model", bpe_folder, "--domain", domain_file, "--target-params", "0.9",
                   "--nsamples", "2", "--seqlen", "32", "--eval-tokens", "64", "--output", str(out), "--no-progress",
                   *extra])
        assert rc == 0, capsys.readouterr().err
        outs[name] = AutoTokenizer.from_pretrained(str(out))
    assert len(outs["kept"](words, add_special_tokens=False)["input_ids"]) == len(before)
    assert len(outs["plain"](words, add_special_tokens=False)["input_ids"]) > len(before)


@pytest.mark.parametrize("arch,kw", [("llama", {"num_key_value_heads": 4}), ("opt", {}), ("phi", {})])
def test_heads_are_removed_without_grouped_query_attention(tmp_path, arch, kw):
    """Plain multi-head attention: a quarter of the heads goes, with their k/v rows (it used to remove
    nothing below 0.5 and refuse above); the model saves and reloads to the same logits."""
    m = tiny_model(arch, **kw)
    heads_before = [C.find_attention(layer, m.config.hidden_size).num_heads for layer in find_decoder_layers(m)]
    plan = C.plan_removal(m, _stats(m), target_params=1.0, heads=0.25)
    assert [k.numel() for k in plan.head_keep] == [h - round(0.25 * h) for h in heads_before]
    C.apply_plan(m, None, plan)
    after = [C.find_attention(layer, m.config.hidden_size).num_heads for layer in find_decoder_layers(m)]
    assert after == [k.numel() for k in plan.head_keep]
    save_compressed(m, str(tmp_path / "out"))
    again = load_compressed(str(tmp_path / "out"), attn_implementation="eager")
    x = random_windows(1, 13, seed=2)
    torch.testing.assert_close(_logits(again, x), _logits(m, x))


def test_vocab_pruning_refuses_an_embedding_that_does_more_than_look_up(bpe, corpus):
    """Gemma3's embedding scales its output: rebuilding it as a plain nn.Embedding changed every logit."""

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    m = _model_for(bpe)
    old = m.get_input_embeddings()
    scaled = ScaledEmbedding(old.num_embeddings, old.embedding_dim)
    scaled.weight = old.weight
    m.set_input_embeddings(scaled)
    with pytest.raises(C.ContextualError, match="this model's is ScaledEmbedding"):
        C.prune_vocabulary_(m, bpe, torch.arange(len(bpe) - 5))


def test_finetune_seed_covers_dropout(bpe, corpus):
    from sparsekit.domain import make_eval_chunks
    from sparsekit.finetune import FinetuneConfig, finetune_

    base = tiny_model("opt", vocab=len(bpe))  # dropout 0.1 in train mode
    ids = torch.tensor(bpe(corpus[:10000], add_special_tokens=False)["input_ids"])
    val = make_eval_chunks(corpus[10000:14000], bpe, 32, 256)
    heads = []
    for _ in range(2):
        m = copy.deepcopy(base)
        finetune_(m, bpe, ids, val, FinetuneConfig(steps=3, lr=1e-3, batch_size=2, seqlen=32, eval_every=3, seed=0))
        heads.append(m.lm_head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


@pytest.mark.parametrize("bad", ["-1", "nan"])
def test_cli_checks_threshold_before_loading(tmp_path, capsys, bad):
    from sparsekit.cli import main

    domain = tmp_path / "d.txt"
    domain.write_text("x")
    code = main(["contextual", "--model", "no-such-model", "--domain", str(domain), "--threshold", bad,
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "--threshold is a mean |activation|, a finite number >= 0" in capsys.readouterr().err


def test_target_already_passed_by_vocabulary_and_heads_is_said(bpe, corpus):
    """Removing the vocabulary and heads can keep less than target_params by itself; then no MLP channel goes, and
    the plan says so instead of keeping quietly less than asked."""
    m = _model_for(bpe, tie=True)
    ids = bpe(corpus[:3000], add_special_tokens=False)["input_ids"]
    st = C.collect_domain_stats(m, torch.tensor(ids[:64]).reshape(4, 16), token_ids=torch.tensor(ids))
    keep = C.vocabulary_keep_set(bpe, st.token_counts)
    with pytest.warns(C.ContextualWarning, match="no MLP channel is removed"):
        plan = C.plan_removal(m, st, target_params=0.999, heads=0.5, vocab_keep=keep)
    assert plan.planned_params / plan.dense_params < 0.999  # vocabulary and heads alone went past 0.999
    assert all(k.numel() == w for k, w in zip(plan.mlp_keep, [C.find_mlp(layer, m.config.hidden_size).width
                                                               for layer in find_decoder_layers(m)]))
