"""`sparsekit prune --offload`: one decoder layer in memory at a time, same result as the in-memory run.

The offloaded run must write the very same weights (compared exactly) and report the same perplexities as
the in-memory run, for several architectures (rotary and learned positions, tied and untied embeddings,
Conv1D), methods, the OWL profile, a sharded input checkpoint and a dtype conversion. No more than one
decoder layer may hold real parameters at any time.
"""

import json
import os

import pytest
import torch

from sparsekit.cli import main
from sparsekit.offload import OffloadedModel, OffloadWriter, SafetensorsFolder
from tiny_models import WORDS, save_tiny_hf_folder, tiny_model, tiny_tokenizer

TEXT = open(WORDS, encoding="utf-8").read()[:60000]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload-models")
    return {arch: save_tiny_hf_folder(str(root / arch), TEXT, arch=arch, layers=3) for arch in
            ("llama", "gpt2", "opt", "phi")}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload-text") / "calib.txt"
    path.write_text(TEXT[:20000])
    return str(path)


def prune(model, out, calib, *extra):
    args = ["prune", "--model", model, "--calib", calib, "--eval", calib, "--nsamples", "4", "--seqlen", "32",
            "--eval-tokens", "256", "--output", str(out), "--no-progress", *extra]
    return main(args)


def state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_result(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    ra = json.loads(open(os.path.join(a, "report.json")).read())
    rb = json.loads(open(os.path.join(b, "report.json")).read())
    assert rb["offload"] is True
    assert rb["dense_ppl"] == pytest.approx(ra["dense_ppl"], rel=1e-6)
    assert rb["pruned_ppl"] == pytest.approx(ra["pruned_ppl"], rel=1e-6)
    assert rb["sparsity"] == ra["sparsity"]
    assert rb["layers"] == ra["layers"]
    assert rb["peak_rss_bytes"] > 0 and rb["model_bytes"] > 0


@pytest.mark.parametrize("arch,extra", [
    ("llama", ["--method", "wanda", "--sparsity", "0.5"]),
    ("llama", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("llama", ["--method", "magnitude", "--sparsity", "0.6"]),
    ("llama", ["--method", "wanda", "--sparsity", "0.6", "--sparsity-profile", "owl", "--owl-m", "2"]),
    ("gpt2", ["--method", "wanda", "--pattern", "2:4"]),
    ("opt", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("phi", ["--method", "wanda", "--sparsity", "0.5"]),
])
def test_offload_equals_in_memory(folders, calib_file, tmp_path, arch, extra):
    assert prune(folders[arch], tmp_path / "mem", calib_file, *extra) == 0
    assert prune(folders[arch], tmp_path / "off", calib_file, *extra, "--offload") == 0
    assert_same_result(str(tmp_path / "mem"), str(tmp_path / "off"))
    index = json.loads((tmp_path / "off" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 + 1  # one shard per layer, plus the outer tensors


def test_offload_sharded_input_and_bf16(folders, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(folders["llama"])
    model.save_pretrained(sharded, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(folders["llama"]).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    extra = ["--method", "wanda", "--sparsity", "0.5", "--dtype", "bfloat16"]
    assert prune(str(sharded), tmp_path / "mem", calib_file, *extra) == 0
    assert prune(str(sharded), tmp_path / "off", calib_file, *extra, "--offload") == 0
    assert_same_result(str(tmp_path / "mem"), str(tmp_path / "off"))
    assert json.loads((tmp_path / "off" / "config.json").read_text())["dtype"] == "bfloat16"


def test_one_layer_in_memory_at_a_time(folders, calib_file, tmp_path):
    from sparsekit import data
    from sparsekit.prune import PruneSpec, prune_model

    om = OffloadedModel(folders["llama"])

    def loaded_layers():
        return [i for i, layer in enumerate(om.layers) if any(p.device.type != "meta" for p in layer.parameters())]

    assert loaded_layers() == []
    assert all(p.device.type == "meta" for p in om.model.parameters())
    seen = []

    class Checking(OffloadWriter):
        def load(self, i):
            assert loaded_layers() == []
            super().load(i)
            seen.append(loaded_layers())

    tok = tiny_tokenizer(TEXT)
    calib = data.calibration_windows(data.tokenize(tok, TEXT[:20000]), 4, 32, 0)
    (tmp_path / "w").mkdir()
    writer = Checking(om, str(tmp_path / "w"))
    prune_model(om.model, PruneSpec("wanda", 0.5), calib, progress=False, layer_io=writer)
    writer.finish()
    assert seen == [[0], [1], [2]]
    assert loaded_layers() == [] and all(p.device.type == "meta" for p in om.model.parameters())


def test_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.rand(9) > 0.5, "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4), "u8": torch.randint(0, 255, (11,), dtype=torch.uint8),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsFolder(str(tmp_path))
    ref = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(reader.keys()) == sorted(ref)
    for k, v in ref.items():
        got = reader.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_errors(folders, calib_file, tmp_path, capsys):
    # a folder without safetensors
    model = tiny_model("llama", layers=1)
    legacy = tmp_path / "legacy"
    model.save_pretrained(legacy)
    os.remove(legacy / "model.safetensors")
    tiny_tokenizer(TEXT).save_pretrained(legacy)
    assert prune(str(legacy), tmp_path / "o1", calib_file, "--method", "wanda", "--sparsity", "0.5",
                 "--offload") == 2
    assert "neither model.safetensors nor model.safetensors.index.json" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    # a checkpoint missing a tensor the architecture has
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tiny_tokenizer(TEXT).save_pretrained(broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert prune(str(broken), tmp_path / "o2", calib_file, "--method", "wanda", "--sparsity", "0.5",
                 "--offload") == 2
    assert "no tensor for 1 parameter" in capsys.readouterr().err

    # option combinations
    assert prune(folders["llama"], tmp_path / "o3", calib_file, "--method", "wanda", "--sparsity", "0.5",
                 "--activations-on-cpu") == 2
    assert "--activations-on-cpu goes with --offload" in capsys.readouterr().err
    assert prune(folders["llama"], tmp_path / "o4", calib_file, "--method", "wanda", "--sparsity", "0.5",
                 "--offload", "--save-compressed") == 2
    assert "--save-compressed" in capsys.readouterr().err


def test_failure_leaves_no_output(folders, calib_file, tmp_path, monkeypatch, capsys):
    def boom(self, i):
        if i == 1:
            raise ValueError("disk full (simulated)")
        return original(self, i)

    original = OffloadWriter.done
    monkeypatch.setattr(OffloadWriter, "done", boom)
    assert prune(folders["llama"], tmp_path / "out", calib_file, "--method", "wanda", "--sparsity", "0.5",
                 "--offload") == 2
    assert "disk full" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_save_compressed_from_prune(folders, calib_file, tmp_path):
    import sparsekit
    from sparsekit.nn import SparseLinear

    assert prune(folders["llama"], tmp_path / "dense", calib_file, "--method", "wanda", "--pattern", "2:4") == 0
    assert prune(folders["llama"], tmp_path / "packed", calib_file, "--method", "wanda", "--pattern", "2:4",
                 "--save-compressed") == 0
    assert (tmp_path / "packed" / "sparsekit.json").exists()
    packed = sparsekit.load_compressed(str(tmp_path / "packed"))
    swapped = [m for m in packed.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 3 * 7
    dense = state(str(tmp_path / "dense"))
    for name, m in packed.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(m.to_dense(), dense[name + ".weight"]), name
    report = json.loads((tmp_path / "packed" / "report.json").read_text())
    assert report["pattern"] == "2:4"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi"])
def test_outer_parameters_read_on_call(folders, arch):
    """The embedding is dropped before the LM head is read; both paths give the same perplexity."""
    from sparsekit import evaluate
    from tiny_models import random_windows

    om = OffloadedModel(folders[arch])
    windows = random_windows(3, 16)
    seen = {}

    def at_head(module, args):
        seen["embedding_on_meta"] = om.model.get_input_embeddings().weight.device.type == "meta"

    handle = om.model.get_output_embeddings().register_forward_pre_hook(at_head)
    lazy = om.window_nll(windows)
    handle.remove()
    assert seen == {"embedding_on_meta": True}
    assert om._lazy_outer  # no fallback was needed
    om._lazy_outer = False
    eager = om.window_nll(windows)
    assert lazy == eager
    assert all(p.device.type == "meta" for p in om.model.parameters())
    from transformers import AutoModelForCausalLM

    ref = evaluate.window_nll(AutoModelForCausalLM.from_pretrained(folders[arch]).eval(), windows)
    assert lazy[1] == ref[1] and lazy[0] == pytest.approx(ref[0], rel=1e-6)


def test_outer_parameter_used_outside_its_module_falls_back(folders):
    """A model that reads an outer weight without calling its module: all outer parameters are loaded."""
    from tiny_models import random_windows

    windows = random_windows(2, 16)
    ref = OffloadedModel(folders["llama"]).window_nll(windows)
    om = OffloadedModel(folders["llama"])
    head, emb = om.model.lm_head, om.model.get_input_embeddings()
    plain = head.forward
    head.forward = lambda x: plain(x) + 0 * emb.weight[0, 0]  # touches the embedding inside the LM head
    assert om.window_nll(windows) == ref
    assert not om._lazy_outer
    assert all(p.device.type == "meta" for p in om.model.parameters())


@pytest.mark.gpu
def test_offload_on_gpu_with_activations_on_cpu(folders, calib_file, tmp_path):
    """Layers on the GPU, calibration activations in host memory: the same weights as the in-memory GPU run."""
    extra = ["--method", "sparsegpt", "--sparsity", "0.5", "--device", "cuda"]
    assert prune(folders["llama"], tmp_path / "mem", calib_file, *extra) == 0
    assert prune(folders["llama"], tmp_path / "off", calib_file, *extra, "--offload", "--activations-on-cpu") == 0
    assert_same_result(str(tmp_path / "mem"), str(tmp_path / "off"))
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["activations_on_cpu"] is True and report["peak_cuda_bytes"] > 0


def test_sigterm_leaves_no_temporary_folder(folders, calib_file, tmp_path):
    """A `kill` mid-run unwinds like Ctrl-C: no OUTPUT and no hidden temporary folder next to it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "from sparsekit.offload import OffloadWriter\n"
            "done = OffloadWriter.done\n"
            "def slow(self, i):\n"
            "    done(self, i)\n"
            "    print('layer', i, flush=True)\n"
            "    import time; time.sleep(60)\n"
            "OffloadWriter.done = slow\n"
            "from sparsekit.cli import main\n"
            f"sys.exit(main({['prune', '--model', folders['llama'], '--calib', calib_file, '--eval', calib_file, '--nsamples', '2', '--seqlen', '32', '--eval-tokens', '64', '--method', 'wanda', '--sparsity', '0.5', '--offload', '--no-progress', '--output', str(out)]!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("layer 0"), (line, proc.stderr.read() if proc.poll() is not None else "")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # the temporary folder exists now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "interrupted; nothing was written" in err, err
    time.sleep(0.1)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
