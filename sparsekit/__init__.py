"""sparsekit: prune causal LMs for a domain and run them faster, with measurements.

Import cost is kept small: heavy modules (transformers, triton) load only when used.
"""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (declares the torch.library ops and loads the backends)
from ._backends import status as backend_status  # noqa: F401
from .compressed import load_compressed, register_compressed_module, save_compressed  # noqa: F401,E402
from .sparsify import SparsifyReport, sparsify_  # noqa: F401,E402
from .export import export_compressed_tensors  # noqa: F401,E402
