"""Registration glue: the only code that touches ``torch.ops.deconvseg``.

Importing it loads the compiled extension (which defines the schemas and the CPU/CUDA kernels) and
adds fake kernels, autograd formulas and the Triton kernels for "cuda".
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from deconvseg_fast import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "deconvseg_fast._C, the compiled extension, is missing or failed to load "
        f"({exc}). Build it from the repository root with `pip install -e .` "
        "(or `make install`, which also creates the virtual environment)."
    ) from exc

from . import crf, pooling  # noqa: F401,E402
from . import conv  # noqa: F401,E402
from . import proposals  # noqa: F401,E402
