"""deconvseg_fast: fast kernels for switch-based and atrous segmentation networks.

``deconvseg_fast.functional`` holds the functions, ``deconvseg_fast.nn`` the drop-in modules,
``deconvseg_fast.models`` the seed networks; ``convert(model)`` swaps an existing model's layers for ours.
"""
from . import ops  # noqa: F401  (loads the compiled ops; raises with build instructions if missing)
from . import functional, nn  # noqa: F401
from . import models  # noqa: F401
from .models import convert, freeze, fuse_conv_bn  # noqa: F401

__version__ = "0.1.0"
