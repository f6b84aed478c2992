import os

import torch

# Triton picks the interpreter when its functions are decorated, i.e. at its first import, and
# something in the suite imports it during collection: decide here, before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
