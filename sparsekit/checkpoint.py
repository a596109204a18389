"""Write output folders atomically: a crash or Ctrl-C never leaves a half-written checkpoint.

Everything is written into a hidden temporary folder next to the destination (same filesystem), then
renamed into place with one ``os.rename`` after its files are fsynced. With ``overwrite``, an existing
destination (a folder or a file) is moved aside first and deleted only after the new folder is in place; if
the rename fails, it is put back. Without ``overwrite``, a destination that appears while the output is being
written is left alone and the new output is discarded (OutputExistsError).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

__all__ = ["OutputExistsError", "check_output_dir", "check_writable_parent", "atomic_output_dir", "save_pruned_model"]


class OutputExistsError(FileExistsError):
    """The output folder exists and --overwrite was not given."""


def check_output_dir(path: str, overwrite: bool, reads: str | None = None) -> None:
    """Fail early (before any long work) if ``path`` cannot be written. ``reads``: a folder the command reads
    (its --model); writing the output there or to a folder that contains it would replace the input."""
    if not str(path).strip():  # abspath("") is the working directory, which overwrite would replace
        raise ValueError("the output path is empty; name a folder")
    if reads is not None and os.path.exists(path):
        out, src = os.path.realpath(path), os.path.realpath(reads)
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            raise ValueError(f"--output {path} {'is' if src == out else 'contains'} the --model folder {reads}; "
                             "writing there would replace the model being read: choose another folder")
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"output folder {path} exists; pass --overwrite to replace it")
    check_writable_parent(path, f"output folder {path}")


def check_writable_parent(path: str, what: str) -> None:
    """Raise PermissionError unless the nearest existing folder above ``path`` is a writable folder: the writers
    here create the missing ones (atomic_output_dir, write_text_atomic), so that is where the write lands."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write {what}: {existing} is not a writable folder")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes ``path``, on any exception it is removed."""
    check_output_dir(path, overwrite)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user makes
    try:
        yield tmp
        _fsync_tree(tmp)  # the files' data reaches the disk before the rename publishes them
        if not overwrite and os.path.lexists(path):  # appeared while we wrote: never replace it unasked
            raise OutputExistsError(f"output folder {path} appeared while writing; pass --overwrite to replace it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        with contextlib.suppress(OSError):  # published already: a failed sync of the entries is not an error
            _fsync_path(parent)  # the renames reach the disk
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)  # put the previous output back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and os.path.lexists(path):
            _remove(old)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to the file ``path`` through a temporary file beside it, renamed into place: a reader never
    sees it half-written, and a failed write leaves what was there."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as the output folders are
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _fsync_tree(root: str) -> None:
    """fsync every file under ``root``, then every folder (their entries), deepest first."""
    folders = []
    for folder, _dirs, files in os.walk(root):
        folders.append(folder)
        for name in files:
            _fsync_path(os.path.join(folder, name))
    for folder in reversed(folders):
        _fsync_path(folder)


def _fsync_path(path: str) -> None:
    """fsync a file, or a folder's entries (where the OS allows opening a folder: not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # some file systems refuse fsync on a folder; a file's must succeed
            raise
    finally:
        os.close(fd)


def save_pruned_model(model, tokenizer, path: str, report: dict, overwrite: bool = False) -> bool:
    """Save model (safetensors, loadable with AutoModelForCausalLM.from_pretrained), tokenizer and
    ``report.json`` into ``path`` atomically. Returns True; or, where the model's structure is not what its config
    builds (it was loaded from a ``sparsekit contextual`` or ``sparsekit laser`` folder: shrunk or low-rank
    layers), saves it with ``sparsekit.save_compressed`` instead and returns False: ``save_pretrained`` would
    write a folder that from_pretrained loads with those layers randomly initialised."""
    from .compressed import config_builds, save_compressed

    if not config_builds(model):
        save_compressed(model, path, tokenizer=tokenizer, report=report, overwrite=overwrite)
        return False
    with atomic_output_dir(path, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return True
