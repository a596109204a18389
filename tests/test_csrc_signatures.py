"""The CPU and CUDA kernels of one op must have the same C++ signature.

torch's dispatcher remembers the C++ signature of the first kernel registered for an op and aborts the
process (a c10::Error thrown while the shared library loads, so `terminate`) when a later kernel of the same
op differs, even by `at::Tensor&` against `const at::Tensor&`. The CPU extension loads first, the CUDA one
second, and CI never builds the CUDA one, so nothing but this check sees a mismatch before a GPU machine
does: `import sparsekit` would die there. This reads the sources, so it needs neither nvcc nor a GPU.
"""
import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# m.impl("op", TORCH_FN(fn)), m.impl("sparsekit::op", &ns::fn), m.impl("op", fn): the op and the function
IMPL = re.compile(r'm\.impl\(\s*"(?:\w+::)?(?P<op>\w+)"\s*,\s*(?:TORCH_FN\(\s*)?&?\s*(?P<fn>[\w:]+)\s*\)?\s*\)')


def _split_params(params: str) -> list[str]:
    """Split a parameter list at the commas outside <...> and (...)."""
    parts, depth, cur = [], 0, []
    for ch in params:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _param_type(param: str) -> str:
    """`const at::Tensor& acc = 0` -> `const at::Tensor&` (name and default dropped, spacing normalised)."""
    param = param.split("=")[0].strip()
    param = re.sub(r"\s*([&*<>,:])\s*", r"\1", param)  # `at::Tensor &` and `at::Tensor&` alike
    param = re.sub(r"\s+", " ", param)
    name = re.search(r"[A-Za-z_]\w*$", param)
    assert name is not None, f"cannot read the parameter {param!r}"
    typ = param[: name.start()].strip()
    assert typ, f"parameter {param!r} has no type (or no name)"
    return typ


def _signature(source: str, fn: str) -> tuple[str, tuple[str, ...]]:
    name = fn.split("::")[-1]
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)  # comments may hold commas
    # the return type may be a template with spaces and commas (std::tuple<at::Tensor, at::Tensor>)
    defs = list(re.finditer(r"(?P<ret>[\w:]+(?:\s*<[^;{}()]*>)?)\s+" + re.escape(name)
                            + r"\s*\((?P<params>[^{;]*?)\)\s*\{", source))
    assert len(defs) == 1, f"{len(defs)} definitions of {name} found (expected exactly one)"
    ret = re.sub(r"\s+", " ", re.sub(r"\s*([<>,])\s*", r"\1", defs[0]["ret"]))
    return ret, tuple(_param_type(p) for p in _split_params(defs[0]["params"]))


def _kernels(folder: str, suffixes: tuple[str, ...]) -> dict[str, tuple[str, tuple[str, ...], str]]:
    found = {}
    for path in sorted((CSRC / folder).iterdir()):
        if path.suffix not in suffixes:
            continue
        source = path.read_text()
        impls = list(IMPL.finditer(source))
        # every registration must be read, or an op would silently drop out of the comparison
        assert len(impls) == source.count("m.impl("), f"{path.name}: an m.impl(...) this test cannot read"
        for impl in impls:
            ret, params = _signature(source, impl["fn"])
            found[impl["op"]] = (ret, params, path.name)
    return found


CPU = _kernels("cpu", (".cpp",))
CUDA = _kernels("cuda", (".cu", ".cpp"))


def test_every_backend_registers_kernels():
    # guards the parser itself: if the registration idiom changes, this fails instead of comparing nothing
    assert len(CPU) >= 8 and len(CUDA) >= 6, (sorted(CPU), sorted(CUDA))
    assert set(CUDA) & set(CPU), "no op has both a CPU and a CUDA kernel"


@pytest.mark.parametrize("op", sorted(set(CPU) & set(CUDA)))
def test_cpu_and_cuda_kernels_have_one_signature(op):
    cpu_ret, cpu_params, cpu_file = CPU[op]
    cuda_ret, cuda_params, cuda_file = CUDA[op]
    assert (cpu_ret, cpu_params) == (cuda_ret, cuda_params), (
        f"{op}: csrc/cpu/{cpu_file} registers {cpu_ret}({', '.join(cpu_params)}) but csrc/cuda/{cuda_file} "
        f"registers {cuda_ret}({', '.join(cuda_params)}); torch aborts when it loads the second")


def test_parser_sees_a_mismatch():
    src = "void f_cpu(const at::Tensor& a, int64_t n) {}\nvoid f_cuda(at::Tensor &a, int64_t n) {}"
    assert _signature(src, "f_cpu") == ("void", ("const at::Tensor&", "int64_t"))
    assert _signature(src, "f_cuda") == ("void", ("at::Tensor&", "int64_t"))
    src = "at::Tensor g(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t k = 3) {"
    assert _signature(src, "sparsekit::g") == ("at::Tensor", ("const at::Tensor&", "const std::optional<at::Tensor>&",
                                                             "int64_t"))
    src = "std::tuple<at::Tensor, at::Tensor> h(const at::Tensor& x, // a, b\n int64_t n) {"
    assert _signature(src, "h") == ("std::tuple<at::Tensor,at::Tensor>", ("const at::Tensor&", "int64_t"))
    assert _signature("std::tuple<int64_t, at::Tensor> h(int64_t n) {", "h")[0] == "std::tuple<int64_t,at::Tensor>"
    assert [m["op"] + " " + m["fn"] for m in IMPL.finditer(
        'm.impl("a", TORCH_FN(ns::f)); m.impl("sparsekit::b", &ns::g); m.impl("c", h);')] == ["a ns::f", "b ns::g",
                                                                                             "c h"]
