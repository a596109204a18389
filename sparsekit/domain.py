"""Domain text: split one file into calibration / fine-tune / validation / held-out parts, and measure
held-out perplexity in a way that stays comparable when the vocabulary (and so the tokenization) changes.

Splits are contiguous runs of whole documents (paragraphs separated by blank lines; single lines when the
file has no blank lines), in file order, so they are reproducible and never share a document.

Perplexity across tokenizers: the held-out text is cut into chunks of ``seqlen`` tokens *of the reference
(dense) tokenizer*. Each model scores every chunk under its own tokenizer (all tokens after the first), and
the total NLL is divided by the number of reference tokens predicted. For the reference model this is the
usual windowed perplexity; a model with a pruned vocabulary, which splits rare words into more pieces, is
charged for the whole text under the same denominator, so the two numbers compare directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DataError
from .models import max_positions

__all__ = ["DEFAULT_SPLITS", "split_documents", "EvalChunks", "make_eval_chunks", "chunk_perplexity"]

DEFAULT_SPLITS = (0.4, 0.4, 0.05, 0.15)  # calibration, fine-tune, validation, held-out test
SPLIT_NAMES = ("calib", "finetune", "val", "test")


def split_documents(text: str, fractions=DEFAULT_SPLITS) -> dict[str, str]:
    """Split ``text`` into {"calib", "finetune", "val", "test"} by whole documents, by character share."""
    if len(fractions) != 4 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError(f"splits must be 4 non-negative fractions summing to 1 (calib,finetune,val,test); "
                        f"got {list(fractions)}")
    if fractions[0] == 0 or fractions[3] == 0:
        raise DataError("the calibration and held-out test splits must not be empty")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if len(docs) < 8:
        docs = [d.strip() for d in text.splitlines() if d.strip()]
    if len(docs) < 4:
        raise DataError(f"domain text has {len(docs)} documents (paragraphs or lines); need at least 4 to split "
                        "into calibration, fine-tune, validation and held-out parts")
    total = sum(len(d) for d in docs)
    bounds, acc = [], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(acc * total)
    parts: list[list[str]] = [[] for _ in range(4)]
    seen = 0
    for d in docs:
        mid = seen + len(d) / 2
        k = sum(mid > b for b in bounds)
        parts[k].append(d)
        seen += len(d)
    if not parts[3]:  # give the test split at least the last document
        for k in (2, 1, 0):
            if len(parts[k]) > 1:
                parts[3].insert(0, parts[k].pop())
                break
    return {name: "\n\n".join(p) for name, p in zip(SPLIT_NAMES, parts)}


@dataclass
class EvalChunks:
    texts: list[str]
    ref_predicted: int  # reference-tokenizer tokens predicted over all chunks (the denominator)
    ref_tokens: int


def make_eval_chunks(text: str, ref_tokenizer, seqlen: int, eval_tokens: int, source: str = "held-out text"
                     ) -> EvalChunks:
    """Chunks of ``seqlen`` reference tokens over the first ``eval_tokens`` tokens of ``text``."""
    enc = ref_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n = min(len(ids), eval_tokens) // seqlen
    if n < 1:
        raise DataError(f"{source} gives {len(ids)} tokens: less than one window of seqlen={seqlen}; give a longer "
                        "domain file or a smaller --seqlen")
    texts, predicted, total = [], 0, 0
    for c in range(n):
        a, b = c * seqlen, (c + 1) * seqlen
        chunk = text[offsets[a][0]: offsets[b - 1][1]]
        k = len(ref_tokenizer(chunk, add_special_tokens=False)["input_ids"])
        texts.append(chunk)
        predicted += k - 1
        total += k
    return EvalChunks(texts, predicted, total)


@torch.no_grad()
def chunk_nll(model, tokenizer, chunks: EvalChunks, progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """Total NLL (nats) of every chunk under ``tokenizer`` and the number of tokens the model predicted."""
    device = next(model.parameters()).device
    limit = max_positions(model)
    total, count = 0.0, 0
    for t in tqdm(chunks.texts, desc=desc, unit="win", disable=not progress, leave=False):
        ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]], device=device)
        if limit is not None and ids.shape[1] > limit:  # a pruned vocabulary splits text into more tokens
            raise DataError(f"an evaluation window of {ids.shape[1]} tokens under this tokenizer is longer than the "
                            f"model's {limit} positions (a pruned vocabulary cuts the text finer than the "
                            "reference tokenizer): pass a smaller --seqlen")
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


def chunk_perplexity(model, tokenizer, chunks: EvalChunks, progress: bool = False, desc: str = "ppl") -> float:
    """exp(total NLL / reference tokens predicted): comparable across tokenizers (see module doc)."""
    nll, _ = chunk_nll(model, tokenizer, chunks, progress, desc)
    return math.exp(nll / chunks.ref_predicted)
