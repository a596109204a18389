"""Multiple-choice evaluation: log-likelihood of each choice given its context, for the sets in shared/data.

One example = several (context, continuation) pairs and the index of the right one. A choice's score is
the sum of log p(continuation tokens | context tokens); ``acc`` takes the argmax of that sum, ``acc_norm``
of the sum divided by the continuation's length in UTF-8 bytes, the separating space included (this removes
the bias towards short answers; lm-evaluation-harness's ``acc_norm`` divides by the choice's characters
without the space, so its numbers can differ by a few decisions). Continuations are scored as " " + choice
text; a context's trailing whitespace is dropped first (PIQA, PubMedQA and LogiQA contexts end in a space,
which would otherwise be a lone space token before the answer).

Native formats read here (see shared/data/MANIFEST.md):

* llm-foundry ICL jsonl: ``{"query", "choices", "gold"}`` (ARC, PIQA, BoolQ, SIQA, OpenBookQA, COPA, ...);
  ``{"context_options", "continuation", "gold"}`` (Winogrande: the context varies, the continuation not);
  ``{"context", "continuation"}`` with a yes/no/maybe answer (PubMedQA-labelled).
* MMLU csv rows ``question,A,B,C,D,answer`` without header, prompted as the question, the four lettered
  options and "Answer:", scored on the letters " A" .. " D".
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["MCExample", "TASKS", "MMLU_DOMAINS", "find_data_dir", "load_task", "score_multiple_choice"]


@dataclass
class MCExample:
    contexts: list[str]  # one per choice
    continuations: list[str]  # one per choice, with their leading space
    gold: int


_ICL = "llm-foundry-icl"
TASKS = {
    "arc_easy": f"{_ICL}/world_knowledge/arc_easy.jsonl",
    "arc_challenge": f"{_ICL}/world_knowledge/arc_challenge.jsonl",
    "piqa": f"{_ICL}/commonsense_reasoning/piqa.jsonl",
    "siqa": f"{_ICL}/commonsense_reasoning/siqa.jsonl",
    "openbook_qa": f"{_ICL}/commonsense_reasoning/openbook_qa.jsonl",
    "copa": f"{_ICL}/commonsense_reasoning/copa.jsonl",
    "commonsense_qa": f"{_ICL}/commonsense_reasoning/commonsense_qa.jsonl",
    "boolq": f"{_ICL}/reading_comprehension/boolq.jsonl",
    "pubmedqa": f"{_ICL}/reading_comprehension/pubmed_qa_labeled.jsonl",
    "winogrande": f"{_ICL}/language_understanding/winogrande.jsonl",
    "logiqa": f"{_ICL}/symbolic_problem_solving/logi_qa.jsonl",
}
MMLU_DOMAINS = {
    "medical": ["professional_medicine", "clinical_knowledge", "college_medicine", "medical_genetics", "anatomy"],
    "legal": ["professional_law", "international_law", "jurisprudence"],
    "economics": ["professional_accounting", "econometrics", "high_school_macroeconomics",
                  "high_school_microeconomics"],
}


def find_data_dir(explicit: str | None = None) -> str:
    """The shared data folder: ``explicit``, $SPARSEKIT_DATA, or ../shared/data next to the repo or cwd."""
    # A folder the user named must exist: falling through to the default would score other data silently.
    for given, what in ((explicit, "--data-dir"), (os.environ.get("SPARSEKIT_DATA"), "SPARSEKIT_DATA")):
        if given:
            if not os.path.isdir(given):
                raise FileNotFoundError(f"{what} {given!r} is not a folder")
            return os.path.abspath(given)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.path.join(here, "..", "shared", "data"), os.path.join(os.getcwd(), "..", "shared", "data")]
    for c in candidates:
        if c and os.path.isdir(c):
            return os.path.abspath(c)
    raise FileNotFoundError("shared data folder not found: pass --data-dir or set SPARSEKIT_DATA")


def _gold(row: dict, n_choices: int, line: int, path: str) -> int:
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not (0 <= gold < n_choices):
        raise ValueError(f"{path}:{line}: gold must be a 0-based index below the {n_choices} choices, got {gold!r}")
    return gold


def _choice_list(value, line: int, path: str, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{path}:{line}: {key} must be a list of at least 2 strings, got {value!r:.80}")
    return value


def _from_icl_row(row: dict, line: int, path: str) -> MCExample:
    # Every continuation starts with the space that separates it from its context; a context's own trailing
    # whitespace is dropped, so that the model is never asked for the answer after a lone space token
    # (the shipped PubMedQA contexts end in "Answer: ").
    if "choices" in row and "query" in row:
        choices = _choice_list(row["choices"], line, path, "choices")
        if not isinstance(row["query"], str):
            raise ValueError(f"{path}:{line}: 'query' must be a string, got {row['query']!r}")
        q = row["query"].rstrip()
        return MCExample([q] * len(choices), [" " + c for c in choices], _gold(row, len(choices), line, path))
    if "context_options" in row:  # winogrande: partial scoring of the fixed continuation
        options = _choice_list(row["context_options"], line, path, "context_options")
        if not isinstance(row.get("continuation"), str):
            raise ValueError(f"{path}:{line}: a context_options row needs a 'continuation' string, got "
                             f"{row.get('continuation')!r}")
        cont = " " + row["continuation"].lstrip()
        return MCExample([o.rstrip() for o in options], [cont] * len(options), _gold(row, len(options), line, path))
    if "context" in row and row.get("continuation") in ("yes", "no", "maybe"):  # pubmedqa-labelled
        options = ["yes", "no", "maybe"]
        ctx = str(row["context"]).rstrip()
        return MCExample([ctx] * 3, [" " + o for o in options], options.index(row["continuation"]))
    raise ValueError(f"{path}:{line}: not a multiple-choice row (keys {sorted(row)})")


def _mmlu_examples(data_dir: str, subjects: list[str], split: str) -> list[MCExample]:
    out = []
    for subject in subjects:
        path = os.path.join(data_dir, "mmlu", "data", split, f"{subject}_{split}.csv")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no MMLU file {path}")
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                    raise ValueError(f"{path}:{line}: an MMLU row is question, 4 options, answer letter A-D; got "
                                     f"{len(row)} fields ending in {row[-1] if row else ''!r:.20}")
                q, options, answer = row[0], row[1:5], row[5].strip()
                prompt = q.strip() + "\n" + "\n".join(f"{L}. {o}" for L, o in zip("ABCD", options)) + "\nAnswer:"
                out.append(MCExample([prompt] * 4, [" A", " B", " C", " D"], "ABCD".index(answer)))
    return out


def is_perplexity_text(name: str) -> bool:
    """Whether a task name is a text for perplexity (a built-in text, or a file that is not .jsonl) rather than a
    multiple-choice set. A path that does not exist raises here, as a missing file rather than an unknown task."""
    from .data import BUILTIN_TEXTS, read_text

    if name in BUILTIN_TEXTS or (os.path.isfile(name) and not name.endswith(".jsonl")):
        return True
    if not os.path.exists(name) and name not in TASKS and not name.startswith("mmlu") and \
            (os.sep in name or name.endswith((".txt", ".jsonl"))):
        if name.endswith(".jsonl"):
            raise FileNotFoundError(f"no such multiple-choice file: {name}")
        read_text(name)  # raises DataError: no such text file
    return False


def load_task(name: str, data_dir: str | None = None, limit: int | None = None, split: str = "test",
              interleave: bool = False) -> list[MCExample]:
    """Examples of a named task (``arc_easy``, ``pubmedqa``, ``mmlu:medical``, ``mmlu:anatomy``, ...) or a
    jsonl file in one of the ICL formats. ``limit`` keeps the first N examples (deterministic; for MMLU, the
    first N of each subject). ``interleave`` (MMLU): the subjects' questions in turn (one of each, then the
    next of each, ...) and ``limit`` on the total, so that any prefix, and any split of it, spans the domain."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all), got {limit}")
    if name.endswith(".jsonl") and os.path.exists(name):
        path = name
    elif name.startswith("mmlu:") or name == "mmlu":
        root = find_data_dir(data_dir)
        key = name.partition(":")[2] or "all"
        if key == "all":
            subjects = sorted(os.path.basename(p)[: -len(f"_{split}.csv")]
                              for p in glob.glob(os.path.join(root, "mmlu", "data", split, f"*_{split}.csv")))
        else:
            subjects = MMLU_DOMAINS.get(key, [key])
        # ``limit`` applies to each subject, so that a domain (several subjects) is sampled evenly
        if not subjects:
            raise FileNotFoundError(f"no MMLU files {os.path.join(root, 'mmlu', 'data', split, f'*_{split}.csv')}")
        examples = []
        per_subject = [_mmlu_examples(root, [subject], split) for subject in subjects]
        if interleave:
            for i in range(max(len(rows) for rows in per_subject)):
                examples.extend(rows[i] for rows in per_subject if i < len(rows))
            examples = examples[:limit] if limit else examples
        else:
            for rows in per_subject:
                examples.extend(rows[:limit] if limit else rows)
        if not examples:
            raise ValueError(f"the MMLU files of {name} in {root} hold no questions")
        return examples
    elif name in TASKS:
        path = os.path.join(find_data_dir(data_dir), TASKS[name])
    else:
        raise ValueError(f"unknown task '{name}': choose one of {', '.join(sorted(TASKS))}, mmlu, "
                         f"mmlu:<subject>, mmlu:<{'|'.join(MMLU_DOMAINS)}>, or a .jsonl path")
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: not a JSON object, got {type(row).__name__}")
                examples.append(_from_icl_row(row, i, path))
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


@torch.no_grad()
def _choice_logliks(model, tokenizer, ex: MCExample, max_len: int, fast: bool = True) -> list[float]:
    device = next(model.parameters()).device
    if fast and len(set(ex.contexts)) == 1:  # one context, one-token continuations (MMLU letters, yes/no/maybe): 1 forward
        c_ids = tokenizer(ex.contexts[0], add_special_tokens=False)["input_ids"]
        k_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.continuations]
        if c_ids and all(len(k) == 1 for k in k_ids):
            ids = torch.tensor([c_ids[-(max_len - 1):]], device=device)
            kw = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}  # LM head on the last position only
            logits = model(input_ids=ids, use_cache=False, **kw).logits[0, -1].float()
            logp = F.log_softmax(logits, dim=-1)
            return [float(logp[k[0]]) for k in k_ids]
    seqs, spans = [], []
    for ctx, cont in zip(ex.contexts, ex.continuations):
        c_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        k_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not k_ids:  # it would score 0, the best log-likelihood there is, and win
            raise ValueError(f"a choice's continuation {cont!r} is empty (no tokens): it cannot be scored")
        if not c_ids:  # the first continuation token needs a position before it: the BOS (else EOS) token, as
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:  # lm-eval-harness does for an empty context
                raise ValueError("an empty context and a tokenizer without BOS or EOS token: the first "
                                 "continuation token cannot be scored")
            c_ids = [start]
        ids = (c_ids + k_ids)[-max_len:]  # keep the continuation; truncate the context from the left
        seqs.append(ids)
        spans.append(min(len(k_ids), len(ids) - 1))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of real tokens are unchanged
        batch[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
    out = []
    for i, (s, k) in enumerate(zip(seqs, spans)):
        n = len(s)
        targets = torch.tensor(s[n - k:], device=device)
        logp = F.log_softmax(logits[i, n - k - 1: n - 1].float(), dim=-1)  # only the continuation's positions
        out.append(float(logp.gather(-1, targets[:, None]).sum()))
    return out


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_multiple_choice(model, tokenizer, examples: list[MCExample], max_len: int = 1024,
                          progress: bool = False, desc: str = "mc") -> dict:
    """{'acc', 'acc_norm', 'n'} over ``examples`` (accuracies as fractions). ``max_len`` (tokens per scored
    sequence, the context truncated from the left) is capped at the model's positions. A non-finite
    log-likelihood (a broken model) is an error, not a pick of choice 0."""
    if not examples:
        raise ValueError("no multiple-choice examples to score")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (a context token and a continuation token), got {max_len}")
    from .models import max_positions

    limit = max_positions(model)
    if limit is not None and limit >= 2:
        max_len = min(max_len, limit)
    correct = correct_norm = 0
    for ex in tqdm(examples, desc=desc, unit="q", disable=not progress, leave=False):
        ll = _choice_logliks(model, tokenizer, ex, max_len)
        if not all(math.isfinite(v) for v in ll):
            raise ValueError(f"the model gave non-finite log-likelihoods {ll} to a question's choices: its outputs "
                             "hold inf or NaN, so an accuracy would be meaningless")
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, ex.continuations)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == ex.gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex.gold)
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
