"""The GPU session's scripts run on the CPU, so a GPU session never spends its few minutes on a script bug.

benchmarks/run_gpu_figures.sh and run_gpu_session.sh call these scripts on a lent GPU; each has a CPU mode that
runs the same code paths (checks against the reference, records, summaries, the markdown it writes) with the
CPU kernels in place of the CUDA ones, small shapes and plain timing. Speeds printed here mean nothing; what
is checked is that every script finishes, finds no wrong result, and writes its tables.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_probe import interpreter_problem

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path even on a machine with a GPU
    if interpreter_problem():  # the scripts then leave Triton out
        env["TRITON_INTERPRET"] = "0"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-4000:]}"
    assert "WRONG RESULT" not in out and "FAILED" not in out, out[-4000:]
    return out


def test_sparse_gemv_script(tmp_path):
    out = _run("bench_sparse_gemv_gpu.py", "--device", "cpu", "--shapes", "tiny", "--rows", "1,3,64,65",
               "--out", str(tmp_path))
    md = (tmp_path / "bench_sparse_gemv_gpu.md").read_text()
    assert "## tiny (96, 256)" in md and "## Targets" in md
    triton_runs = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not interpreter_problem()
    impls = ["CPU C++"] + (["Triton"] if triton_runs else [])
    for fmt in ("2:4", "bitmap50", "bitmap70", "bitmap80"):
        for impl in impls:
            row = next(line for line in md.splitlines() if line.startswith(f"| {fmt} | {impl} |"))
            assert row.count("x |") == 4, row  # a speedup in every M column
    assert (tmp_path / "bench_sparse_gemv_gpu.csv").exists()
    assert "not a speed figure" in out


def test_sparse_gemv_script_refuses_bad_arguments(tmp_path):
    for args, what in ((["--shapes", "llama9"], "unknown shape"), (["--formats", "3:4"], "unknown format"),
                       (["--rows", "0"], "--rows must be >= 1")):
        proc = subprocess.run([sys.executable, str(BENCH / "bench_sparse_gemv_gpu.py"), "--device", "cpu", *args,
                               "--out", str(tmp_path)], cwd=BENCH, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and what in proc.stderr, proc.stderr


def test_ops_script(tmp_path):
    _run("bench_ops_gpu.py", "--device", "cpu", "--out", str(tmp_path))
    md = (tmp_path / "bench_ops_gpu.md").read_text()
    for op in ("channel_sqnorm_accumulate_", "channel_stats_accumulate_", "wanda_score", "nm_mask 2:4",
               "nm_mask 4:8"):
        assert f"| {op} |" in md, op
    assert "| CPU C++ |" in md and "| reference |" in md


def test_sparsegpt_script(tmp_path):
    out = _run("bench_sparsegpt_gpu.py", "--device", "cpu", "--scale", "32", "--tokens", "256", "--repeats", "1",
               "--out", str(tmp_path))
    md = (tmp_path / "sparsegpt_gpu.md").read_text()
    assert md.count("| ok |") == 4 and md.count("checks ok") == 4, out[-3000:]  # 2 shapes x (50%, 2:4)


@pytest.mark.slow
def test_decode_script(tmp_path):
    out = _run("bench_decode_gpu.py", "--device", "cpu", "--tiny", "--compile-mode", "default", "--layers", "2",
               "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path), timeout=600)
    assert "| 1 |" in (tmp_path / "decode_gpu.md").read_text(), out[-3000:]


def test_memcheck_cases_script():
    out = _run("gpu_memcheck_cases.py", "--device", "cpu")
    assert out.strip().endswith("ok"), out[-2000:]
