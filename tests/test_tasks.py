"""Multiple-choice loading and scoring."""

import json

import pytest
import torch
import torch.nn.functional as F

from sparsekit.tasks import MCExample, _choice_logliks, load_task, score_multiple_choice
from tiny_models import WORDS, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    text = open(WORDS, encoding="utf-8").read()[:60000]
    return tiny_model("llama"), tiny_tokenizer(text)


def naive_loglik(model, tok, ctx, cont):
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    k = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c + k])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(c) + j - 1, t] for j, t in enumerate(k)))


def test_batched_padded_logliks_equal_one_at_a_time(tiny):
    model, tok = tiny
    ex = MCExample(["the cat sat on", "the cat sat on", "in the year of the"],
                   [" the mat", " a very long continuation of the story", " war"], 0)
    got = _choice_logliks(model, tok, ex, max_len=512)
    want = [naive_loglik(model, tok, c, k) for c, k in zip(ex.contexts, ex.continuations)]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_accuracy_and_length_normalisation(monkeypatch, tiny):
    model, tok = tiny
    import sparsekit.tasks as T

    # choice 0 has the higher sum; per byte, the 100-byte choice 1 is far likelier: -0.12 vs -5 per byte
    monkeypatch.setattr(T, "_choice_logliks", lambda *a, **k: [-10.0, -12.0])
    exs = [MCExample(["q", "q"], [" y", " " + "x" * 99], 1)]
    assert score_multiple_choice(model, tok, exs) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_icl_formats(tmp_path):
    rows = [
        {"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1},
        {"context_options": ["A went so A", "B went so B"], "continuation": "left.", "gold": 0},
        {"context": "Context: ... Answer:", "continuation": "maybe"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b, c = load_task(str(path))
    assert a.contexts == ["Question: 2+2?"] * 2 and a.continuations == [" 3", " 4"] and a.gold == 1
    assert b.contexts == ["A went so A", "B went so B"] and b.continuations == [" left."] * 2 and b.gold == 0
    assert c.continuations == [" yes", " no", " maybe"] and c.gold == 2
    assert len(load_task(str(path), limit=2)) == 2


def test_bad_rows_and_names(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "no choices"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not a multiple-choice row"):
        load_task(str(path))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")


def test_shared_sets_load(shared_data):
    assert len(load_task("arc_easy", shared_data)) == 2376
    pub = load_task("pubmedqa", shared_data)
    assert len(pub) == 1000 and {e.gold for e in pub} <= {0, 1, 2}
    med = load_task("mmlu:medical", shared_data)
    assert len(med) > 500 and med[0].continuations == [" A", " B", " C", " D"]
    assert med[0].contexts[0].endswith("\nAnswer:") and "\nD. " in med[0].contexts[0]
    assert len(load_task("winogrande", shared_data, limit=5)) == 5


def test_one_forward_path_for_shared_context_equals_the_batched_path(tiny):
    model, tok = tiny
    ex = MCExample(["the cat sat on the"] * 3, [" the", " a", " of"], 0)  # one-token continuations
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in ex.continuations)
    fast = _choice_logliks(model, tok, ex, max_len=512)
    slow = _choice_logliks(model, tok, ex, max_len=512, fast=False)
    assert fast == pytest.approx(slow, rel=1e-5, abs=1e-5)
    assert fast == pytest.approx([naive_loglik(model, tok, c, k) for c, k in zip(ex.contexts, ex.continuations)],
                                 rel=1e-5, abs=1e-5)


def _write_jsonl(path, rows):
    import json as _json

    path.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("row,match", [
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "gold must be a 0-based index below the 2 choices, got 2"),
    ({"query": "q", "choices": ["a", "b"], "gold": -1}, "got -1"),
    ({"query": "q", "choices": ["a", "b"], "gold": 1.9}, "got 1.9"),
    ({"query": "q", "choices": ["a", "b"]}, "got None"),
    ({"query": "q", "choices": "yes", "gold": 0}, "choices must be a list of at least 2 strings"),
])
def test_bad_rows_are_named_with_file_and_line(tmp_path, row, match):
    from sparsekit.tasks import load_task

    path = _write_jsonl(tmp_path / "t.jsonl", [{"query": "ok", "choices": ["a", "b"], "gold": 0}, row])
    with pytest.raises(ValueError, match=match) as e:
        load_task(path)
    assert "t.jsonl:2:" in str(e.value)


def test_context_trailing_space_is_not_scored_as_a_token(tmp_path):
    """PIQA / PubMedQA / LogiQA contexts end in a space: it is dropped, so ' ' + choice follows the text."""
    from sparsekit.tasks import load_task

    path = _write_jsonl(tmp_path / "t.jsonl", [{"query": "Answer: ", "choices": ["yes", "no"], "gold": 0},
                                              {"context": "Answer: ", "continuation": "no"}])
    ex = load_task(path)
    assert ex[0].contexts == ["Answer:", "Answer:"] and ex[0].continuations == [" yes", " no"]
    assert ex[1].contexts[0] == "Answer:" and ex[1].gold == 1
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_task(path, limit=0)


def test_broken_inputs_are_errors_not_scores(tmp_path, tiny):
    """Review fixes: a NaN model, an empty continuation, unparsable rows, a missing MMLU folder and a binary
    text file are errors naming the problem (they used to give an accuracy, a traceback or a perplexity)."""
    from sparsekit.data import DataError, read_text

    model, tok = tiny
    ex = [MCExample(["the cat sat on"] * 2, [" the mat", " a hat"], 0)]
    broken = tiny_model("llama")
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite log-likelihoods"):
        score_multiple_choice(broken, tok, ex)
    with pytest.raises(ValueError, match="continuation '' is empty"):
        score_multiple_choice(model, tok, [MCExample(["the cat", "the cat"], ["", " sat"], 0)])
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        score_multiple_choice(model, tok, ex, max_len=1)
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        score_multiple_choice(model, tok, [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        load_task(str(bad))
    wino = tmp_path / "wino.jsonl"
    wino.write_text(json.dumps({"context_options": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(ValueError, match=r"wino.jsonl:1: a context_options row needs a 'continuation' string"):
        load_task(str(wino))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MMLU files"):
        load_task("mmlu", str(tmp_path / "empty"))
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x93NUMPY\x00\x01\xff\xfe")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_text(str(binary))


def test_empty_context_is_scored_after_bos_or_eos(tiny):
    """An empty context: the first continuation token is predicted from the BOS (else EOS) token, as
    lm-eval-harness does, instead of going unscored (a one-token choice used to score 0 and win)."""
    model, tok = tiny
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    got = _choice_logliks(model, tok, MCExample(["", ""], [" the", " cat"], 0), max_len=64, fast=False)
    text = tok.decode([start])
    want = [naive_loglik(model, tok, text, k) for k in (" the", " cat")]
    assert all(v < 0 for v in got)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_mmlu_interleave_spans_the_domain(shared_data):
    """interleave=True: a prefix of an MMLU domain takes its subjects in turn (cli_laser splits val / test from
    it), where the default concatenates them subject by subject."""
    plain = load_task("mmlu:medical", str(shared_data), limit=400)
    mixed = load_task("mmlu:medical", str(shared_data), limit=400, interleave=True)
    assert len(mixed) == 400
    first_subject = plain[:100]
    assert mixed[0].contexts == plain[0].contexts
    assert not all(any(m.contexts == p.contexts for p in first_subject) for m in mixed[:10])
