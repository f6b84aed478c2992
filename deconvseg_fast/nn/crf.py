"""``DenseCRF``: the fully connected CRF as a module; ``learnable=True`` makes it CRF-as-RNN."""
from __future__ import annotations

import torch

from .. import functional as F


class DenseCRF(torch.nn.Module):
    """Mean-field inference of a fully connected CRF over a batch (see ``functional.dense_crf``).

    With ``learnable=True`` the two kernel weights and the [L, L] label-compatibility matrix are
    parameters trained through all mean-field iterations (Zheng et al.'s CRF-as-RNN); the
    compatibility starts as Potts (1 - I) unless ``compat`` is given.
    """

    def __init__(self, num_labels: int, iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_weight: float = 3.0,
                 bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_weight: float = 10.0,
                 compat: torch.Tensor | None = None, normalization: str = "symmetric", learnable: bool = False):
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if compat is not None and tuple(compat.shape) != (num_labels, num_labels):
            raise ValueError(f"compat must be [num_labels, num_labels] = [{num_labels}, {num_labels}], "
                             f"got {list(compat.shape)}")
        if normalization not in F.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {F.NORMALIZATIONS}, got {normalization!r}")
        self.num_labels = num_labels
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.normalization = normalization
        self.learnable = learnable
        if learnable:
            self.gaussian_weight = torch.nn.Parameter(torch.tensor(float(gaussian_weight)))
            self.bilateral_weight = torch.nn.Parameter(torch.tensor(float(bilateral_weight)))
            potts = 1.0 - torch.eye(num_labels)
            self.compat = torch.nn.Parameter(compat.detach().clone().float() if compat is not None else potts)
        else:
            self.gaussian_weight = float(gaussian_weight)
            self.bilateral_weight = float(bilateral_weight)
            self.register_buffer("compat", None if compat is None else compat.detach().clone().float())

    def forward(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if unary.dim() == 4 and unary.shape[1] != self.num_labels:
            raise ValueError(f"unary has {unary.shape[1]} labels, this DenseCRF was built for {self.num_labels}")
        return F.dense_crf(unary, image, iterations=self.iterations, gaussian_sxy=self.gaussian_sxy,
                           gaussian_weight=self.gaussian_weight, bilateral_sxy=self.bilateral_sxy,
                           bilateral_srgb=self.bilateral_srgb, bilateral_weight=self.bilateral_weight,
                           compat=self.compat, normalization=self.normalization)

    def extra_repr(self) -> str:
        return (f"num_labels={self.num_labels}, iterations={self.iterations}, gaussian_sxy={self.gaussian_sxy}, "
                f"bilateral_sxy={self.bilateral_sxy}, bilateral_srgb={self.bilateral_srgb}, "
                f"normalization={self.normalization!r}, learnable={self.learnable}")
