"""Triton kernels of sparsekit's ops, one module per capability.

* ``masks``          ``nm_mask``                     N:M keep-masks (stable ranking inside each group of M)
* ``wanda``          ``wanda_score``                 |W_ij| * sqrt(sq_norm_j) in float32
* ``channel_stats``  ``channel_sqnorm_accumulate_``  acc_j += sum_t x_tj^2 (one pass over x)
                     ``channel_stats_accumulate_``   the same, and abs_acc_j += sum_t |x_tj| (one pass)
* ``dispatch``       the entry points ``sparsekit._backends`` registers on the CUDA key; each takes the op's
                     arguments, allocates the output, picks block sizes and launches a kernel.

Every kernel matches ``sparsekit.ops.reference`` (masks bit for bit). Importing this package imports
triton; ``sparsekit`` itself imports it lazily.
"""
