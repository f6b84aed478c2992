"""The seed networks on deconvseg_fast's kernels, weight loading, and model conversion.

Networks (``width`` multiplies every channel count; 1.0 is the published architecture):
``segnet``, ``deconvnet``, ``deeplab_largefov``, ``deeplab_largefov_crf``, ``fcn8s``,
``edeconvnet``, ``decouplednet``, ``compact_segnet`` (the small default model). Pure-torch twins with the
same state_dict keys are in ``deconvseg_fast.reference.models``.
"""
from .compact import CompactSegNet, compact_segnet
from .convert import convert, freeze, fuse_conv_bn
from .deconvnet import DeconvNet, EDeconvNet, crop_proposals, deconvnet, edeconvnet
from .decouplednet import DecoupledNet, decouplednet
from .deeplab import DeepLabLargeFOV, DeepLabLargeFOVCRF, deeplab_largefov, deeplab_largefov_crf
from .fcn import FCN8s, fcn8s
from .segnet import SegNet, segnet
from .weights import load_checkpoint, load_vgg16, save_checkpoint

__all__ = [
    "convert", "freeze", "fuse_conv_bn", "load_vgg16", "save_checkpoint", "load_checkpoint", "crop_proposals",
    "segnet", "deconvnet", "deeplab_largefov", "deeplab_largefov_crf", "fcn8s", "edeconvnet", "decouplednet",
    "compact_segnet", "CompactSegNet",
    "SegNet", "DeconvNet", "DeepLabLargeFOV", "DeepLabLargeFOVCRF", "FCN8s", "EDeconvNet", "DecoupledNet",
]
