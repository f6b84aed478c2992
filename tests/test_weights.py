"""torchvision-format VGG16 / VGG16-BN state dicts into the seed networks, and checkpoint round trips.

The torchvision state dicts are built here, in memory, with torchvision's keys and shapes (nothing is
downloaded; torchvision is not needed) and written to tmp_path.
"""
from __future__ import annotations

import pytest
import torch

from deconvseg_fast import models as M
from deconvseg_fast.models.weights import VGG16_BN_CONVS, VGG16_CONVS

CFG = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def vgg16_state_dict(bn: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd, cin = {}, 3
    for i, c in zip(VGG16_BN_CONVS if bn else VGG16_CONVS, CFG):
        sd[f"features.{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.1
        if bn:
            sd[f"features.{i + 1}.weight"] = torch.rand(c, generator=g) + 0.5
            sd[f"features.{i + 1}.bias"] = torch.randn(c, generator=g) * 0.1
            sd[f"features.{i + 1}.running_mean"] = torch.randn(c, generator=g) * 0.1
            sd[f"features.{i + 1}.running_var"] = torch.rand(c, generator=g) + 0.5
            sd[f"features.{i + 1}.num_batches_tracked"] = torch.tensor(100)
        cin = c
    # classifier: a structured fill (value = f(out, in)) so the decimation can be checked by index,
    # without materialising a random 25088 x 4096 tensor twice.
    sd["classifier.0.weight"] = torch.arange(4096, dtype=torch.float32)[:, None] * 1e-3 + \
        torch.arange(25088, dtype=torch.float32)[None, :] * 1e-7
    sd["classifier.0.bias"] = torch.arange(4096, dtype=torch.float32)
    sd["classifier.3.weight"] = torch.arange(4096, dtype=torch.float32)[:, None] + \
        torch.arange(4096, dtype=torch.float32)[None, :] * 1e-4
    sd["classifier.3.bias"] = -torch.arange(4096, dtype=torch.float32)
    sd["classifier.6.weight"] = torch.zeros(1000, 4096)
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vgg")
    paths = {}
    for bn in (False, True):
        paths[bn] = d / f"vgg16{'_bn' if bn else ''}.pth"
        torch.save(vgg16_state_dict(bn), paths[bn])
    return paths


def test_segnet_from_vgg16_bn(vgg_files):
    model = M.load_vgg16(M.segnet(), vgg_files[True])
    sd = torch.load(vgg_files[True], weights_only=True)
    torch.testing.assert_close(model.enc1[0].conv.weight, sd["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.enc5[2].conv.bias, sd["features.40.bias"], rtol=0, atol=0)
    torch.testing.assert_close(model.enc3[1].bn.running_var, sd["features.18.running_var"], rtol=0, atol=0)


def test_deconvnet_fc_reshaped(vgg_files):
    model = M.load_vgg16(M.deconvnet(), vgg_files[True])
    sd = torch.load(vgg_files[True], weights_only=True)
    torch.testing.assert_close(model.fc6.conv.weight, sd["classifier.0.weight"].reshape(4096, 512, 7, 7),
                               rtol=0, atol=0)
    torch.testing.assert_close(model.fc7.conv.weight[:, :, 0, 0], sd["classifier.3.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.enc2[0].bn.weight, sd["features.8.weight"], rtol=0, atol=0)


def test_deeplab_decimation(vgg_files):
    model = M.load_vgg16(M.deeplab_largefov(), vgg_files[False])
    w6 = model.fc6.conv.weight  # [1024, 512, 3, 3]
    # output o keeps VGG filter 4o; tap (r, c) keeps VGG tap (3r, 3c) of input channel i, whose
    # flattened column is i * 49 + 7 * 3r + 3c.
    for o, i, r, c in [(0, 0, 0, 0), (1, 2, 1, 2), (1023, 511, 2, 2), (77, 300, 2, 0)]:
        expect = 4 * o * 1e-3 + (i * 49 + 21 * r + 3 * c) * 1e-7
        assert abs(w6[o, i, r, c].item() - expect) < 1e-5
    assert model.fc6.conv.bias[5].item() == 20.0
    assert model.fc7.conv.weight[3, 5, 0, 0].item() == pytest.approx(12 + 20 * 1e-4)
    assert model.fc7.conv.bias[3].item() == -12.0
    assert model.fc6.conv.dilation == (12, 12)


def test_bn_source_folds_into_bn_free_model(vgg_files):
    """vgg16_bn into FCN-8s (no BN): conv1 of the loaded model equals conv -> eval BN of the source."""
    model = M.load_vgg16(M.fcn8s(), vgg_files[True], fc=False)
    sd = torch.load(vgg_files[True], weights_only=True)
    conv = torch.nn.Conv2d(3, 64, 3, padding=1)
    bn = torch.nn.BatchNorm2d(64).eval()
    conv.load_state_dict({"weight": sd["features.0.weight"], "bias": sd["features.0.bias"]})
    bn.load_state_dict({k: sd[f"features.1.{k}"] for k in bn.state_dict()})
    x = torch.randn(1, 3, 8, 8)
    ours = torch.nn.functional.conv2d(x, model.conv1[0].conv.weight, model.conv1[0].conv.bias, padding=1)
    torch.testing.assert_close(ours, bn(conv(x)), rtol=1e-4, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(KeyError, match="state dict"):
        M.load_vgg16(M.segnet(width=1 / 16), {"features.0.weight": torch.zeros(1)})
    sd = vgg16_state_dict(False)
    with pytest.raises(ValueError, match="width"):
        M.load_vgg16(M.segnet(width=1 / 16), sd)
    with pytest.raises(TypeError, match="model"):
        M.load_vgg16(torch.nn.Linear(2, 2), sd)


@pytest.mark.parametrize("name,kwargs", [("segnet", {"index_format": "window"}), ("deeplab_largefov_crf", {"iterations": 3}),
                                         ("edeconvnet", {}), ("decouplednet", {})])
def test_checkpoint_round_trip(tmp_path, name, kwargs):
    model = getattr(M, name)(width=1 / 16, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "ckpt.pt"
    M.save_checkpoint(model, path)
    loaded = M.load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    torch.load(path, weights_only=True)  # plain tensors and literals only


def test_checkpoint_errors(tmp_path):
    torch.save({"foo": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="path"):
        M.load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(TypeError, match="model"):
        M.save_checkpoint(torch.nn.Linear(1, 1), tmp_path / "y.pt")
