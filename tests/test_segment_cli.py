"""`deconvseg-fast segment`: overlay with a legend, label PNG, probabilities .npy, and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from deconvseg_fast.cli import main
from deconvseg_fast.models import save_checkpoint, segnet

H, W, L = 64, 80, 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(segnet(num_classes=L, width=0.125), path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 2] = (200, 40, 30)
    img[:, W // 2:] = (30, 60, 220)
    img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(img).save(path)
    return path


def _one_line_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deconvseg-fast: error: ") and needle in err, err


def test_segment_writes_overlay_labels_and_probabilities(image, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(image), "-o", str(out), "--weights", str(ckpt), "--labels", "--probs",
                 "--crf-iterations", "3"]) == 0
    assert "scene_overlay.png" in capsys.readouterr().out
    overlay = np.asarray(Image.open(out / "scene_overlay.png"))
    assert overlay.shape[0] >= H and overlay.shape[1] > W  # the legend strip is appended on the right
    labels = np.asarray(Image.open(out / "scene_labels.png"))
    assert labels.shape == (H, W) and labels.dtype == np.uint8 and labels.max() < L
    probs = np.load(out / "scene_probs.npy")
    assert probs.shape == (L, H, W) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(0), labels)  # the labels are the CRF marginals' argmax


def test_segment_without_crf_with_resize_and_two_images(image, ckpt, tmp_path):
    other = tmp_path / "b" / "scene.png"  # same stem in another folder: must not overwrite
    other.parent.mkdir()
    Image.open(image).save(other)
    out = tmp_path / "out"
    assert main(["segment", str(image), str(other), "-o", str(out), "--weights", str(ckpt), "--no-crf",
                 "--resize", "32x40", "--labels", "--no-legend", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene_2_labels.png", "scene_2_overlay.png",
                                                     "scene_labels.png", "scene_overlay.png"]
    assert np.asarray(Image.open(out / "scene_overlay.png")).shape == (32, 40, 3)


def test_segment_errors_are_one_line(image, ckpt, tmp_path, capsys):
    _one_line_error(capsys, ["segment", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"),
                             "--weights", str(ckpt)], "no such file")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    _one_line_error(capsys, ["segment", str(junk), "-o", str(tmp_path / "o"), "--weights", str(ckpt)],
                    "cannot read")
    _one_line_error(capsys, ["segment", str(image), "-o", str(tmp_path / "o"), "--model", "nope"],
                    "unknown model 'nope'")
    _one_line_error(capsys, ["segment", str(image), "-o", str(tmp_path / "o"), "--weights", str(ckpt),
                             "--resize", "big"], "--resize")
    not_ckpt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, not_ckpt)
    _one_line_error(capsys, ["segment", str(image), "-o", str(tmp_path / "o"), "--weights", str(not_ckpt)],
                    "neither a deconvseg_fast checkpoint nor a VGG16 state dict")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["segment", str(image), "-o", str(blocker / "o"), "--weights", str(ckpt)],
                    "--output")
