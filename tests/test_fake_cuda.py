"""SparseLinear's CUDA branches, run on fake CUDA tensors: no GPU needed, a CUDA build of torch needed.

Under torch's FakeTensorMode a CUDA build of torch makes CUDA tensors that carry shape, dtype and device but no
data, and sparsekit's ops run their fake (shape) functions. So the Python that only runs for CUDA inputs
(SparseLinear's path choice by rows and dtype, the ops it calls, moving layers and models to CUDA) runs here,
and a slip in it shows before a GPU session. No kernel runs: correctness on the device is the gpu-marked tests'.

CI's own .venv has a CPU build of torch, where these skip; .ci/cuda_build_check runs them on torch
2.11.0+cu130 (the GPU machines' torch).
"""
import copy

import pytest
import torch
from torch import nn

if not torch.version.cuda:
    pytest.skip("needs a CUDA build of torch (no GPU needed); .ci/cuda_build_check runs these",
                allow_module_level=True)

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.nn import sparse_linear as sl_mod  # noqa: E402
from sparsekit.nn import SparseLinear  # noqa: E402
from linear_check import pruned_linear  # noqa: E402

from sparsekit.ops.reference import nm_mask_reference  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FORMATS = ["2:4", "4:8", "bitmap"]
OPS = {"2:4": "nm_linear", "4:8": "nm_linear", "bitmap": "bitmap_linear"}


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).removeprefix("sparsekit."))
        return func(*args, **(kwargs or {}))


def _sparse_layer(fmt, dtype, cslt=False):
    """A 128 x 256 SparseLinear in ``fmt`` (bitmap at 70% sparsity), built on the CPU."""
    linear = pruned_linear(256, 128, fmt, dtype=dtype, sparsity=0.7 if fmt == "bitmap" else 0.5)
    return SparseLinear.from_linear(linear, format=fmt, cslt=cslt)


@pytest.fixture
def sparse_rows(monkeypatch):
    """CUDA_SPARSE_MAX_ROWS as a measured table would fill it: the packed kernels up to 64 rows."""
    table = {(fmt, dt): 64 for fmt in ("2:4", "4:8", "bitmap") for dt in (torch.bfloat16, torch.float16)}
    monkeypatch.setattr(sl_mod, "CUDA_SPARSE_MAX_ROWS", table)
    return table


@pytest.mark.parametrize("forced", [False, True], ids=["default-table", "sparse-to-64"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_forward_on_fake_cuda(fmt, dtype, forced, request):
    if forced:
        request.getfixturevalue("sparse_rows")
    layer = _sparse_layer(fmt, dtype)
    for shape in [(1, 256), (16, 256), (64, 256), (65, 256), (2, 3, 256), (256, 256)]:
        rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]
        dev_layer = copy.deepcopy(layer)  # outside the mode: .to("cuda") inside it makes the fake tensors
        with FakeTensorMode(allow_non_fake_inputs=True):
            dev_layer.to("cuda")
            assert dev_layer.values.device.type == "cuda" and dev_layer.values.dtype == dtype
            x = torch.randn(*shape, device="cuda", dtype=dtype)
            path = dev_layer.path(rows, x.device, dtype)
            with _OpLog() as log:
                y = dev_layer(x)
        assert y.shape == (*shape[:-1], 128) and y.dtype == dtype and y.device.type == "cuda", (y.shape, y.dtype)
        want = "sparse" if forced and dtype != torch.float32 and rows <= 64 else "unpack"
        assert path == want, (fmt, dtype, rows, path)
        called = [op for op in log.ops if op in ("nm_linear", "bitmap_linear", "nm_unpack_linear",
                                                 "bitmap_unpack_linear")]
        expect = OPS[fmt] if want == "sparse" else OPS[fmt].replace("_linear", "_unpack_linear")
        assert called == [expect], (fmt, dtype, rows, log.ops)


def test_cslt_path_is_chosen_on_cuda_for_2_4_half_precision():
    # torch._cslt_compress has no fake kernel, so the copy is not built here; the path choice is checked
    layer = _sparse_layer("2:4", torch.bfloat16, cslt=True)
    assert layer._cslt_possible(torch.device("cuda"), torch.bfloat16) == torch.backends.cusparselt.is_available()
    assert not layer._cslt_possible(torch.device("cuda"), torch.float32)
    assert not layer._cslt_possible(torch.device("cpu"), torch.bfloat16)


def test_sparsified_model_forward_on_fake_cuda(sparse_rows):
    from tiny_models import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():  # 2:4 by magnitude in every decoder linear (sparsify_ leaves the LM head dense)
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight *= nm_mask_reference(module.weight.abs(), 2, 4)
    model = model.to(torch.bfloat16)
    report = sparsekit.sparsify_(model, format="2:4", cslt=False)
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers, report
    with FakeTensorMode(allow_non_fake_inputs=True):
        dev_model = model.to("cuda")
        ids = torch.randint(0, model.config.vocab_size, (1, 8), device="cuda")
        with _OpLog() as log, torch.no_grad():
            logits = dev_model(ids).logits  # prefill: 8 rows
            step = dev_model(ids[:, :1]).logits  # one decode row
    assert logits.shape == (1, 8, model.config.vocab_size) and logits.device.type == "cuda"
    assert step.shape == (1, 1, model.config.vocab_size)
    assert log.ops.count("nm_linear") == 2 * len(swapped), log.ops.count("nm_linear")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [4, 100], ids=["packed-kernel", "unpack"])
def test_cuda_forward_traces_as_one_graph(fmt, rows, sparse_rows):
    # torch.export(strict=True) traces with dynamo, fullgraph: a graph break in the CUDA branch of forward
    # would raise. The graph must hold exactly the one op the path names (the torch.compile contract,
    # here for CUDA inputs).
    layer = _sparse_layer(fmt, torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        layer.to("cuda")
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    graph = torch.export.export(layer, (x,), strict=True).graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    want = OPS[fmt] if rows <= 64 else OPS[fmt].replace("_linear", "_unpack_linear")
    assert ops == [f"sparsekit.{want}.default"], ops
