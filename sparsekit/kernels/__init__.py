"""Compiled-kernel backends of sparsekit's ops.

* ``sparsekit.kernels.triton``: Triton kernels for ``nm_mask``, ``wanda_score``,
  ``channel_sqnorm_accumulate_``, ``channel_stats_accumulate_``, ``nm_linear`` and ``bitmap_linear``,
  registered on the CUDA dispatch key by ``sparsekit._backends`` when the CUDA C++ extension (``csrc/cuda``)
  is not loaded. They also run on CPU tensors under ``TRITON_INTERPRET=1``, which is how the test suite
  checks them without a GPU.

Nothing here is imported by ``import sparsekit``: triton loads on the first CUDA call of a Triton-backed op.
"""
