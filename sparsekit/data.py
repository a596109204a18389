"""Text in, token windows out: calibration windows and evaluation windows.

Data is a text file, or one of the built-in slices shipped in ``sparsekit/builtin_data`` (see ATTRIBUTION.md there):

* ``wikitext2-valid``: 256 KiB of WikiText-2 valid, the default calibration text;
* ``wikitext2-test``:  the first 96 KiB of WikiText-2 test, the default evaluation text.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

__all__ = [
    "BUILTIN_TEXTS",
    "DataError",
    "read_text",
    "tokenize",
    "calibration_windows",
    "eval_windows",
]

BUILTIN_TEXTS = {
    "wikitext2-valid": "wikitext2_valid.txt",
    "wikitext2-test": "wikitext2_test_head.txt",
}


class DataError(ValueError):
    """Calibration or evaluation text that cannot be used (missing, empty, too short)."""


def read_text(source: str) -> str:
    """The text of a built-in slice name or a file path. Raises DataError if missing or empty."""
    if source in BUILTIN_TEXTS:
        text = resources.files("sparsekit").joinpath("builtin_data", BUILTIN_TEXTS[source]).read_text(encoding="utf-8")
    elif os.path.isfile(source):
        with open(source, "rb") as f:
            raw = f.read()
        try:  # strict: a binary file (a checkpoint passed by mistake) or UTF-16 text would be scored as noise
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                            "convert it (iconv -t utf-8) or pass another file") from None
        if "\0" in text:
            raise DataError(f"{source} holds NUL bytes (character {text.index(chr(0))}): a binary file, not text")
    else:
        raise DataError(f"no such text file: {source} (or use a built-in: {', '.join(BUILTIN_TEXTS)})")
    if not text.strip():
        raise DataError(f"{source} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of the whole text, without special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str = "text"
                        ) -> torch.Tensor:
    """(nsamples, seqlen) windows at uniformly random starts, drawn with ``seed`` (reproducible).

    Raises DataError if the text holds fewer than ``seqlen + 1`` tokens.
    """
    if nsamples < 1:
        raise DataError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    n = tokens.numel()
    if n < seqlen + 1:
        raise DataError(
            f"calibration text {source} is too short: {n} tokens, need more than seqlen={seqlen} "
            "(give a longer file or a smaller --seqlen)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s: s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, eval_tokens: int, source: str = "text") -> torch.Tensor:
    """Non-overlapping (n, seqlen) windows over the first ``eval_tokens`` tokens (n = eval_tokens // seqlen).

    Raises DataError if that leaves no whole window.
    """
    limit = min(eval_tokens, tokens.numel())
    n = limit // seqlen
    if n < 1:
        raise DataError(
            f"evaluation text {source} gives {tokens.numel()} tokens; with --eval-tokens {eval_tokens} that is "
            f"less than one window of seqlen={seqlen}"
        )
    return tokens[: n * seqlen].reshape(n, seqlen)
