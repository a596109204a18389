"""End-to-end decode on a GPU: a 2:4-pruned Llama-architecture model with Llama-3-8B shapes (random weights)
against the same model with masked dense weights, both compiled, through transformers' ``generate``.

The model: LlamaConfig with Llama-3-8B's sizes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256;
--layers decoder layers, 32 by default), built on the GPU in bf16 with transformers' random init. Every
linear layer of the decoder is pruned 2:4 by magnitude (the LM head stays dense, as sparsify_ leaves it).
"dense" keeps the masked weights in nn.Linear (cuBLAS); "sparse" is a copy after ``sparsekit.sparsify_``
(format 2:4). Decoding runs with a static KV cache, which transformers compiles on CUDA by itself
(``CompileConfig(fullgraph=True, mode=--compile-mode)``; "reduce-overhead" = CUDA graphs, transformers'
default). Prompt: --prompt-tokens random ids, --batch copies; greedy, --new-tokens tokens; decode tokens/s
counts the tokens after the first over the time between the first and last step (prefill excluded);
the median of --repeats rounds after two warm-up rounds (the first compiles and records the CUDA graphs). Each
model keeps one StaticCache, reset in place before every call: given only cache_implementation="static",
transformers 5 builds a fresh cache per generate() at new addresses, and the CUDA graphs would be re-recorded
inside every timed decode (sparsekit.cli_bench.static_cache). Token agreement counts the generated
positions only. --no-cslt skips SparseLinear's cuSPARSELt copy (used only above --sparse-max-rows rows).
On CPU the same compile is forced (transformers compiles by itself only on accelerators), so
`--device cpu --tiny --compile-mode default` checks the fullgraph trace without a GPU.

The issue's target: sparse decode at batch 1 >= 1.25x the dense tokens/s, both compiled.

    python benchmarks/bench_decode_gpu.py [--out benchmarks/results] [--layers 32] [--batch 1]

Writes decode_gpu.md and decode_gpu.json (device, versions, date) into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import RESULTS, device_name, doc_parser  # noqa: E402

TARGET = 1.25


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(layers: int, device, dtype, tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:  # a smoke test of this script on any device, not a speed figure
        sizes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=1024)
    else:
        sizes = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, **sizes)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


@torch.no_grad()
def prune_24_(model) -> int:
    """Magnitude 2:4 on every linear layer of the decoder stack; returns how many were pruned."""
    from sparsekit.ops.reference import nm_mask_reference

    n = 0
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.mul_(nm_mask_reference(mod.weight.abs(), 2, 4))
            n += 1
    return n


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--out", default=RESULTS,
                        help="folder for decode_gpu.md / .json (default: benchmarks/results/)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32, the default)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model (default 3)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode transformers uses for decoding (default: reduce-overhead); "
                             "'eager' turns compilation off")
    parser.add_argument("--sparse-max-rows", type=int, default=None,
                        help="override sparsekit.nn.sparse_linear.CUDA_SPARSE_MAX_ROWS for 2:4 bf16 (largest M for "
                             "the sparse kernel; default: the table as shipped)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only checks the script)")
    parser.add_argument("--tiny", action="store_true",
                        help="hidden 256 instead of Llama-3-8B's sizes: checks the script, times nothing meaningful")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--cslt", action=argparse.BooleanOptionalAction, default=True,
                        help="keep SparseLinear's cuSPARSELt copy (--no-cslt: skip it; the decode path at M <= "
                             "--sparse-max-rows never reads it)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_decode_gpu.py needs a CUDA device: torch.cuda.is_available() is False. Nothing was timed.",
              file=sys.stderr)
        return 1

    import transformers
    from transformers import CompileConfig

    import sparsekit
    from sparsekit.cli_bench import _timed_generate, static_cache
    from sparsekit.nn import sparse_linear

    dev, dtype = torch.device(args.device), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    what = "tiny (hidden 256)" if args.tiny else "Llama-3-8B-shaped"
    _say(f"building a {args.layers}-layer {what} model on {dev} (bf16, random weights)")
    dense = build_model(args.layers, dev, dtype, args.tiny)
    _say(f"pruned {prune_24_(dense)} linear layers 2:4 by magnitude")
    if args.sparse_max_rows is not None:
        sparse_linear.CUDA_SPARSE_MAX_ROWS[("2:4", dtype)] = args.sparse_max_rows
    sparse = copy.deepcopy(dense)
    report = sparsekit.sparsify_(sparse, format="2:4", cslt=args.cslt)
    paths = sorted({m.path(1, dev, dtype) for m in sparse.modules() if isinstance(m, sparse_linear.SparseLinear)})
    _say(f"sparsified {len(report.layers)} layers: {report.bytes_before / 2**30:.2f} GiB -> "
         f"{report.bytes_after / 2**30:.2f} GiB; path at M=1: {paths}; CUDA_SPARSE_MAX_ROWS = "
         f"{ {f'{k[0]} {k[1]}': v for k, v in sparse_linear.CUDA_SPARSE_MAX_ROWS.items()} }")
    models = {"dense": dense, "sparse": sparse}
    for m in models.values():
        m.generation_config.use_cache = True
        if args.compile_mode == "eager":
            m.generation_config.disable_compile = True
        else:
            cc = CompileConfig(fullgraph=True, mode=args.compile_mode)
            cc._compile_all_devices = dev.type != "cuda"  # a CPU smoke run then checks the fullgraph trace too
            m.generation_config.compile_config = cc

    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        ids = torch.randint(0, dense.config.vocab_size, (batch, args.prompt_tokens), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(1))
        outs, times = {}, {name: [] for name in models}
        # one static cache per model, reset in place before each call: transformers would build a fresh one
        # per generate(), at new addresses, and CUDA graphs would re-record inside every timed decode
        caches = {name: static_cache(m, ids, args.new_tokens) for name, m in models.items()}
        for w in range(2):  # 1st round compiles and records; the 2nd checks the timed path is warm
            for name, m in models.items():
                t0 = time.perf_counter()
                outs[name] = _timed_generate(m, ids, args.new_tokens, static=True, cache=caches[name])[2]
                _say(f"batch {batch}: {name} warm-up {w + 1} took {time.perf_counter() - t0:.1f} s")
        new = slice(args.prompt_tokens, None)  # generated positions only: the prompt is equal by construction
        same = (outs["dense"][:, new] == outs["sparse"][:, new]).float().mean().item()
        steps = batch * (args.new_tokens - 1)
        for r in range(args.repeats):
            for name, m in models.items():
                sync()
                times[name].append(_timed_generate(m, ids, args.new_tokens, static=True, cache=caches[name])[1])
            _say(f"batch {batch} round {r + 1}: " + ", ".join(
                f"{n} {steps / t[-1]:.1f} tok/s" for n, t in times.items()))
        tps = {n: steps / statistics.median(t) for n, t in times.items()}
        results[batch] = {"batch": batch, "dense_tok_s": tps["dense"], "sparse_tok_s": tps["sparse"],
                          "speedup": tps["sparse"] / tps["dense"], "token_agreement": same,
                          "decode_s": times}
        _say(f"batch {batch}: dense {tps['dense']:.1f} tok/s, sparse {tps['sparse']:.1f} tok/s, "
             f"{tps['sparse'] / tps['dense']:.2f}x; generated tokens equal in {100 * same:.1f}% of positions")

    import triton

    meta = {"device": device_name(dev), "model": what, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "layers": args.layers, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "compile_mode": args.compile_mode, "paths_at_m1": paths,
            "backends": {k: v.detail for k, v in sparsekit.backend_status().items()},
            "linear_GiB": [report.bytes_before / 2**30, report.bytes_after / 2**30]}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"decode_gpu{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    md = [f"# End-to-end decode, {args.layers}-layer {what} model, 2:4 vs masked dense (bf16)", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()] + ["",
           "| batch | dense tok/s | sparse tok/s | speedup | tokens equal |", "|---:|---:|---:|---:|---:|"]
    md += [f"| {b} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | {r['speedup']:.2f}x | "
           f"{100 * r['token_agreement']:.1f}% |" for b, r in results.items()]
    if 1 in results:
        s = results[1]["speedup"]
        md += ["", f"- batch 1: {s:.2f}x; {'meets' if s >= TARGET else 'MISSES'} the {TARGET}x target"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
