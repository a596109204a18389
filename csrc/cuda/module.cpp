// Python module of the CUDA extension sparsekit._C_cuda.
//
// It defines nothing callable: the kernels in csrc/cuda/*.cu register themselves with the dispatcher
// (TORCH_LIBRARY_IMPL(sparsekit, CUDA, ...)) when this shared library loads, so `import sparsekit._C_cuda`
// (done by sparsekit/_backends.py) is all it takes. The op schemas are declared once, in Python
// (sparsekit/ops/__init__.py); none are defined here.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "sparsekit CUDA kernels (nm_mask, wanda_score, channel_sqnorm_accumulate_, channel_stats_accumulate_, "
      "nm_linear, bitmap_linear), registered on the CUDA key";
}
