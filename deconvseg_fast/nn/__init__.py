"""Drop-in modules: swap ``torch.nn`` for ``deconvseg_fast.nn`` and keep the rest of the model."""
from .conv import AtrousConv2d
from .crf import DenseCRF
from .pooling import MaxPool2d, MaxUnpool2d

__all__ = ["AtrousConv2d", "DenseCRF", "MaxPool2d", "MaxUnpool2d"]
