"""Tiny random-weight models of several architectures, built from configs (no downloads)."""

from __future__ import annotations

import os

import torch

ARCHS = ("llama", "mistral", "qwen2", "phi", "opt", "gpt2")


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = 256, **extra):
    cfg = _tiny_config(arch, hidden, layers, vocab)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _tiny_config(arch: str, hidden: int, layers: int, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=16, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4,
                            word_embed_proj_dim=hidden, vocab_size=vocab, num_hidden_layers=layers,
                            max_position_embeddings=256)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=256,
                             bos_token_id=1, eos_token_id=1)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), attn_implementation="eager")
    return model.float().eval()


def tiny_tokenizer(text: str, vocab: int = 256):
    """A word-level tokenizer trained on ``text`` with the ``tokenizers`` library (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_hf_folder(path: str, text: str, arch: str = "llama", **kw) -> str:
    """Write a tiny model and its tokenizer as a Hugging Face folder usable with --model."""
    model = tiny_model(arch, **kw)
    model.save_pretrained(path)
    tiny_tokenizer(text, vocab=model.config.vocab_size).save_pretrained(path)
    return path


def random_windows(n: int, seqlen: int, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


WORDS = os.path.join(os.path.dirname(__file__), "..", "sparsekit", "builtin_data", "wikitext2_valid.txt")
