"""Build sparsekit's compiled extensions.

* ``sparsekit._C``      CPU C++ kernels (csrc/cpu/*.cpp), always built.
* ``sparsekit._C_cuda`` CUDA C++ kernels (csrc/cuda/*.cu), built only where the installed torch has CUDA
  and nvcc is found.

Environment:
  SPARSEKIT_NO_EXTENSIONS=1  compile nothing; the package then runs on its plain-PyTorch (and Triton)
                             implementations.
  TORCH_CUDA_ARCH_LIST       CUDA targets, default "8.0;9.0+PTX" (A100 and H100 machine code, and sm_90 PTX
                             that newer GPUs compile at load time). Never hard-coded below.
  MAX_JOBS                   parallel compile jobs (read by torch's BuildExtension with ninja).
  CUDA_HOME                  the CUDA toolkit; unset, torch takes it two folders above the nvcc on PATH (and
                             this file corrects that when that nvcc is a wrapper outside the toolkit).

Install with ``pip install -e . --no-build-isolation --no-deps`` so the build sees the torch that will run it.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # Relative paths: setuptools refuses absolute source paths in editable installs.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _point_cuda_home_at_the_toolkit():
    """torch's build tooling takes CUDA_HOME two folders above the nvcc on PATH. Where that nvcc is a wrapper
    script outside the toolkit (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``), CUDA_HOME
    becomes ``/usr/local`` and the link fails with "cannot find -lcudart". Set CUDA_HOME to the toolkit then:
    the folder that holds both bin/nvcc and include/cuda_runtime.h. Runs before torch.utils.cpp_extension is
    imported, which reads CUDA_HOME once."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return  # torch falls back to /usr/local/cuda by itself

    def toolkit(home):
        return os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h"))

    if toolkit(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return
    def version(home):  # /usr/local/cuda-13.0 -> (13, 0); numbers, not strings (13.0 after 9.2)
        return tuple(int(v) if v.isdigit() else -1 for v in home.rsplit("-", 1)[-1].split("."))

    for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True)):
        if toolkit(home):
            print(f"sparsekit: {nvcc} is not inside a CUDA toolkit; building with CUDA_HOME={home}", file=sys.stderr)
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    if os.environ.get("SPARSEKIT_NO_EXTENSIONS", "0") not in ("", "0"):
        print("sparsekit: SPARSEKIT_NO_EXTENSIONS set, building no extension", file=sys.stderr)
        return [], {}

    import torch

    _point_cuda_home_at_the_toolkit()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3"]  # no -std: torch's build tooling picks the standard its headers need
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    exts = [
        CppExtension(
            "sparsekit._C",
            _sources("csrc/cpu/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_nvcc = bool(nvcc) and os.path.exists(nvcc)
    if torch.version.cuda and have_nvcc:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        exts.append(
            CUDAExtension(
                "sparsekit._C_cuda",
                _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3"],
                    # no --use_fast_math: sqrtf must round as the reference does, or Wanda masks change
                    "nvcc": ["-O3", "-lineinfo"],
                },
            )
        )
    else:
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc not found"
        print(f"sparsekit: skipping the CUDA extension ({why})", file=sys.stderr)

    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
