"""Short recovery fine-tuning on domain text, with a held-out split for early stopping.

Full fine-tuning of every remaining parameter with AdamW (linear warm-up, cosine decay, gradient clipping).
Removed structure stays removed: contextual pruning deletes it physically, so there is nothing to mask.
Every ``eval_every`` steps the validation NLL is measured; the best state seen (including the starting one)
is restored at the end, and training stops after ``patience`` evaluations without improvement.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .domain import EvalChunks, chunk_nll

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune_"]


@dataclass
class FinetuneConfig:
    steps: int
    lr: float = 5e-5
    batch_size: int = 4
    seqlen: int = 256
    warmup: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 10
    patience: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"finetune steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.seqlen < 2 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("batch_size, eval_every and patience must be >= 1 and seqlen >= 2")


@dataclass
class FinetuneResult:
    steps_run: int
    best_step: int
    best_val_nll: float
    start_val_nll: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def finetune_(model, tokenizer, train_ids: torch.Tensor, val: EvalChunks, cfg: FinetuneConfig,
              progress: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` in place on random ``cfg.seqlen`` windows of ``train_ids`` (1-D token ids)."""
    if train_ids.numel() < cfg.seqlen + 1:
        raise ValueError(f"fine-tune split has {train_ids.numel()} tokens, fewer than seqlen+1={cfg.seqlen + 1}")
    device = next(model.parameters()).device
    t0 = time.perf_counter()

    def val_nll() -> float:
        model.eval()
        nll, _ = chunk_nll(model, tokenizer, val)
        return nll / val.ref_predicted

    start = best = val_nll()
    best_step, best_state = 0, copy.deepcopy(model.state_dict())
    history = [{"step": 0, "val_nll": start}]
    if cfg.steps == 0:
        return FinetuneResult(0, 0, best, start, history, time.perf_counter() - t0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # The seed covers dropout too (model.train() draws from the global generator), without changing the
    # caller's random state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        bad, step = 0, 0
        bar = tqdm(range(cfg.steps), desc="fine-tune", unit="step", disable=not progress, leave=False)
        for step in bar:
            model.train()
            starts = torch.randint(0, train_ids.numel() - cfg.seqlen, (cfg.batch_size,), generator=gen)
            batch = torch.stack([train_ids[s: s + cfg.seqlen] for s in starts.tolist()]).to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                v = val_nll()
                history.append({"step": done, "train_loss": float(loss.detach()), "val_nll": v})
                if v < best:
                    best, best_step, bad = v, done, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
    model.load_state_dict(best_state)
    model.eval()
    return FinetuneResult(step + 1, best_step, best, start, history, time.perf_counter() - t0)
