"""Peak memory of `sparsekit prune --offload` against the model size, on a random-weight checkpoint on disk.

1. Writes a random-weight Llama-architecture checkpoint of at least 2 GB (default: hidden 1536, 18 layers,
   MLP 4096, GQA 12/4 heads, vocabulary 49152 (SmolLM2's tokenizer), float32: 2.42 GB) as a sharded
   safetensors folder, one layer at a time (the writer itself never holds the model).
2. Runs `sparsekit prune` on it in a fresh process, with --offload and without, and reads each process's
   peak resident set size from the kernel (wait4's ru_maxrss: everything, including the final save).
3. Writes a markdown table (and JSON) to benchmarks/results/.

    python benchmarks/bench_offload.py --workdir runs/offload          # ~10 min on 2 cores
    python benchmarks/bench_offload.py --workdir runs/offload --skip-in-memory --methods wanda,sparsegpt

Random weights make perplexity meaningless; the point is memory. Peak RSS includes the Python interpreter,
torch and transformers (~0.4 GB measured on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402


def write_checkpoint(folder: str, hidden: int, layers: int, inter: int, heads: int, kv_heads: int, seed: int = 0
                     ) -> int:
    """A random-weight LlamaForCausalLM in ``folder`` (float32, one shard per layer). Returns its bytes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from sparsekit.models import resolve_model

    src = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.folder, **src.kwargs())
    vocab = len(tok)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    weight_map, total = {}, 0
    n_shards = layers + 1

    def save(j, tensors):
        nonlocal total
        name = f"model-{j:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    save(1, {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden),
             "lm_head.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(i + 2, {
            p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def run_prune(model: str, out: str, method: str, offload: bool, args) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "sparsekit")
    cmd = [exe, "prune", "--model", model, "--method", method, "--sparsity", "0.5",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens),
           "--output", out, "--overwrite", "--no-progress", "--threads", str(args.threads)]
    if offload:
        cmd.append("--offload")
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    report = json.load(open(os.path.join(out, "report.json")))
    return {"method": method, "offload": offload, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_at_report_bytes": report["peak_rss_bytes"], "wall_s": wall,
            "prune_s": report["prune_seconds"], "dense_ppl": report["dense_ppl"], "pruned_ppl": report["pruned_ppl"],
            "sparsity": report["sparsity"], "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/offload", help="where the checkpoint and outputs go (default %(default)s)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="wanda", help="comma-separated (default %(default)s)")
    ap.add_argument("--skip-in-memory", action="store_true", help="only the --offload runs")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--note", default=None, help="a line added to the results (e.g. the machine was shared)")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of an earlier results file for the runs not repeated now (same checkpoint)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "offload_cpu"), help="results prefix")
    args = ap.parse_args()

    ckpt = os.path.join(args.workdir, "random-llama")
    if not os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")):
        print(f"writing a random-weight checkpoint to {ckpt}", flush=True)
        write_checkpoint(ckpt, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
    ckpt_bytes = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))["metadata"]["total_size"]
    if ckpt_bytes < 2 * 10**9:
        print(f"warning: the checkpoint is {ckpt_bytes / 1e9:.2f} GB, below the 2 GB the issue asks for")
    rows = []
    for method in args.methods.split(","):
        for offload in (True, False):
            if not offload and args.skip_in_memory:
                continue
            out = os.path.join(args.workdir, f"out-{method}-{'offload' if offload else 'memory'}")
            rows.append(run_prune(ckpt, out, method, offload, args))
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    if args.update and os.path.exists(args.out + ".json"):  # keep the earlier rows of the runs not repeated
        old = json.load(open(args.out + ".json"))
        if old.get("checkpoint_bytes") == ckpt_bytes:
            ran = {(r["method"], r["offload"]) for r in rows}
            rows = [r for r in old["rows"] if (r["method"], r["offload"]) not in ran] + rows
            rows.sort(key=lambda r: (r["method"] != "wanda", r["method"], not r["offload"]))

    import transformers

    gb = 1e9
    lines = [
        "# `sparsekit prune --offload`: peak memory against model size",
        "",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"Python {sys.version.split()[0]}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, date {time.strftime('%Y-%m-%d')}",
        f"- checkpoint: random-weight LlamaForCausalLM, hidden {args.hidden}, {args.layers} layers, MLP "
        f"{args.intermediate}, heads {args.heads}/{args.kv_heads}, vocabulary of SmolLM2's tokenizer, float32, "
        f"**{ckpt_bytes / gb:.2f} GB** on disk ({args.layers + 1} shards)",
        f"- run: `sparsekit prune --method M --sparsity 0.5 --nsamples {args.nsamples} --seqlen {args.seqlen} "
        f"--eval-tokens {args.eval_tokens} --threads {args.threads}` with and without `--offload`: dense "
        "perplexity, pruning, pruned perplexity, save",
        *([f"- note: {args.note}"] if args.note else []),
        "- peak RSS: the process's maximum resident set size from the kernel (wait4 ru_maxrss), whole run including "
        "the save; it includes Python, torch and transformers themselves",
        "",
        "| method | mode | peak RSS (GB) | peak RSS / checkpoint | wall (s) | prune (s) | sparsity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {'--offload' if r['offload'] else 'in memory'} | "
                     f"{r['peak_rss_bytes'] / gb:.2f} | {r['peak_rss_bytes'] / ckpt_bytes:.2f} | {r['wall_s']:.0f} | "
                     f"{r['prune_s']:.0f} | {r['sparsity']:.4f} |")
    per_layer = ckpt_bytes / args.layers  # upper bound on one layer's bytes (outer tensors included)
    act = 2 * args.nsamples * args.seqlen * args.hidden * 4
    lines += ["", "Each row comes from its own run of the command; a row's date is in the JSON (`date`)."] if args.update else []
    lines += ["", f"One decoder layer is {(ckpt_bytes - 2 * 49152 * args.hidden * 4) / args.layers / gb:.3f} GB; "
              f"the embedding and the LM head are {49152 * args.hidden * 4 / gb:.3f} GB each; the two calibration "
              f"activation buffers are {act / gb:.3f} GB."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"checkpoint_bytes": ckpt_bytes, "rows": rows, "args": vars(args), "per_layer_bytes": per_layer},
                  f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
