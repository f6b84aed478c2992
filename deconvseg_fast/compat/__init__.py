"""API-compatible shims for libraries people already use.

- ``deconvseg_fast.compat.pydensecrf``: a drop-in for pydensecrf / pydensecrf2
  (``import deconvseg_fast.compat.pydensecrf.densecrf as dcrf``).
"""
