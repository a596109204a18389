"""Output folders are written atomically and load back with plain transformers."""

import json
import os

import pytest
import torch

from sparsekit.checkpoint import OutputExistsError, atomic_output_dir, save_pruned_model
from sparsekit.prune import PruneSpec, prune_model
from tiny_models import random_windows, tiny_model


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").write("x")
            raise RuntimeError("crash while writing")
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary folder left behind


def test_output_folder_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(str(tmp_path / "ckpt")):
            pass
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "ckpt").st_mode & 0o777) == 0o755


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_output_dir(str(out)):
            pass
    assert (out / "old.txt").read_text() == "old"


def test_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            raise RuntimeError
    assert (out / "old.txt").exists() and not (out / "new.txt").exists()
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert (out / "new.txt").exists() and not (out / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_output_that_appears_while_writing_is_never_replaced_unasked(tmp_path):
    """Without overwrite, a folder another run writes to the same path meanwhile survives; ours is discarded."""
    out = tmp_path / "ckpt"
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(os.listdir(out)) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left


def test_overwrite_replaces_a_file_without_leftovers(tmp_path):
    out = tmp_path / "ckpt"
    out.write_text("a file where the folder goes")
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert out.is_dir() and (out / "new.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_model_loads_with_from_pretrained(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    prune_model(model, PruneSpec("wanda", None, (2, 4)), random_windows(2, 16), progress=False)
    out = tmp_path / "pruned"
    save_pruned_model(model, None, str(out), {"method": "wanda"})
    assert json.loads((out / "report.json").read_text())["method"] == "wanda"
    loaded = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = random_windows(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), k
