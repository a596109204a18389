// Python module init for sparsekit._C. The module itself exposes nothing: importing it loads this shared
// library, whose static TORCH_LIBRARY_IMPL(sparsekit, CPU, ...) blocks (masks.cpp, wanda.cpp,
// channel_stats.cpp) register the CPU kernels on the dispatcher. The schemas live in sparsekit/ops/__init__.py.

#include <Python.h>

#define SPARSEKIT_CONCAT_(a, b) a##b
#define SPARSEKIT_CONCAT(a, b) SPARSEKIT_CONCAT_(a, b)

static struct PyModuleDef sparsekit_cpu_module = {
    PyModuleDef_HEAD_INIT,
    "sparsekit._C",
    "sparsekit's CPU C++ kernels. Importing this module registers them on the CPU dispatch key of the\n"
    "sparsekit ops (torch.ops.sparsekit.*); it has no Python-level functions of its own.",
    -1,
    nullptr,
};

PyMODINIT_FUNC SPARSEKIT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&sparsekit_cpu_module);
}
