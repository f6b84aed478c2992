"""Drop-in replacement for pydensecrf (and its PyPI fork pydensecrf2).

Changing the import is the whole migration::

    import pydensecrf.densecrf as dcrf                          # before
    import deconvseg_fast.compat.pydensecrf.densecrf as dcrf    # after
    from deconvseg_fast.compat.pydensecrf.utils import unary_from_softmax, create_pairwise_bilateral

Same classes, arguments, shapes, constants and numbers (Krähenbühl's mean field on his permutohedral
lattice, reproduced step by step); the lattice filter runs in deconvseg_fast's C++ kernel, multi-
threaded. See ``densecrf`` for the few documented differences.
"""
from . import densecrf, utils  # noqa: F401
