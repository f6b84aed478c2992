"""``MaxPool2d`` / ``MaxUnpool2d`` with torch.nn's constructors, plus ``index_format``.

They subclass torch.nn's modules, so ``isinstance`` checks, ``repr`` and attribute access in
existing code keep working.
"""
from __future__ import annotations

import torch

from .. import functional as F
from ..ops.pooling import check_format, pair


class MaxPool2d(torch.nn.MaxPool2d):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False,
                 index_format: str = "flat"):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        check_format(index_format, pair(kernel_size, "kernel_size"))
        self.index_format = index_format

    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices,
                            index_format=self.index_format)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", index_format={self.index_format!r}"


class MaxUnpool2d(torch.nn.MaxUnpool2d):
    def __init__(self, kernel_size, stride=None, padding=0, index_format: str = "flat", dilation=1):
        super().__init__(kernel_size, stride, padding)
        check_format(index_format, pair(kernel_size, "kernel_size"))
        self.index_format = index_format
        self.dilation = dilation

    def forward(self, input: torch.Tensor, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        return F.max_unpool2d(input, indices, self.kernel_size, self.stride, self.padding, output_size,
                              index_format=self.index_format, dilation=self.dilation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", index_format={self.index_format!r}, dilation={self.dilation}"
