"""Drop-in modules: swap ``torch.nn`` for ``deconvseg_fast.nn`` and keep the rest of the model."""
from .crf import DenseCRF
from .pooling import MaxPool2d, MaxUnpool2d

__all__ = ["DenseCRF", "MaxPool2d", "MaxUnpool2d"]
