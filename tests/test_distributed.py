"""deconvseg_fast.distributed on a local two-worker Ray instance: the Ray path gives the labels of the
local path (same Segmenter / segment_video, same torch thread count), and bad arguments say which.

One Ray instance for the module (started by the fixture, shut down after). If Ray cannot start, the
tests fail with the reason: nothing here is skipped.
"""
import sys
import time

import numpy as np
import pytest
import ray  # a test requirement (requirements.txt): missing, the module fails to import, not skips
import torch
from PIL import Image

from deconvseg_fast import distributed as D

NUM_WORKERS = 2
THREADS = 1  # torch threads per worker, and of the local runs they are compared with


class TinySegmenter:
    """A plain torch model behind the Segmenter call contract (frames uint8 [B, H, W, 3] -> labels
    uint8 [B, H, W]), shipped to the workers by pickling (registered by value below)."""

    def __init__(self, classes=5, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, classes, 5, padding=2)).eval()

    def __call__(self, frames):
        x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return self.net(x).argmax(1).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def local_ray():
    # The workers unpickle TinySegmenter: ship this module's classes by value, as the workers cannot
    # import a test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.perf_counter()
    # The CPU reservation of _start_local: one logical CPU beyond the two workers' (see
    # deconvseg_fast.distributed's docstring for the deadlock it avoids).
    D._start_local(ray, NUM_WORKERS, 1.0)
    assert ray.is_initialized(), "ray.init returned but Ray is not initialized"
    print(f"local Ray started in {time.perf_counter() - t0:.1f} s")
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _write_images(folder, sizes):
    from deconvseg_fast.scenes import render_image

    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        img, _ = render_image(i, h, w)
        Image.fromarray(img).save(folder / f"frame_{i:02d}.png")
    return sorted(folder.glob("*.png"))


def _local_labels(segmenter, path):
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return segmenter(np.asarray(Image.open(path).convert("RGB"))[None])[0]
    finally:
        torch.set_num_threads(saved)


def test_images_plain_model_same_labels_as_local(local_ray, tmp_path):
    # Two sizes in one folder: batches are split by size on the workers.
    paths = _write_images(tmp_path / "in", [(48, 64)] * 4 + [(40, 56)] * 3)
    seg = TinySegmenter()
    out = D.segment_images(tmp_path / "in", tmp_path / "out", segmenter=seg, num_workers=NUM_WORKERS,
                           batch_size=2, threads_per_worker=THREADS)
    assert list(out) == [str(p) for p in paths]  # input order, absolute paths
    for p in paths:
        got = D.read_label_png(out[str(p)])
        assert out[str(p)] == str(tmp_path / "out" / (p.stem + ".png"))
        np.testing.assert_array_equal(got, _local_labels(seg, p))
    assert ray.is_initialized()  # used the fixture's instance, did not shut it down


def test_images_return_labels_without_output_dir(local_ray, tmp_path):
    paths = _write_images(tmp_path / "in", [(32, 40)] * 3)
    seg = TinySegmenter(seed=3)
    out = D.segment_images([str(p) for p in paths], None, segmenter=seg, num_workers=NUM_WORKERS,
                           batch_size=4, threads_per_worker=THREADS)
    assert list(out) == [str(p) for p in paths]
    for p in paths:
        assert out[str(p)].dtype == np.uint8 and out[str(p)].shape == (32, 40)
        np.testing.assert_array_equal(out[str(p)], _local_labels(seg, p))


_CHILD_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from deconvseg_fast import distributed as D
import ray

class Threshold:  # defined in __main__, so pickled by value to the workers
    def __call__(self, frames):
        return (np.asarray(frames)[..., 0] > 127).astype(np.uint8)

folder, out, address = sys.argv[1], sys.argv[2], sys.argv[3] or None
rng = np.random.default_rng(0)
for i in range(3):
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
res = D.segment_images(folder, out, segmenter=Threshold(), num_workers=2, batch_size=1, address=address)
ok = all((D.read_label_png(o) == (np.asarray(Image.open(p))[..., 0] > 127)).all() for p, o in res.items())
print(json.dumps({"n": len(res), "ok": bool(ok), "initialized_after": ray.is_initialized()}))
"""


@pytest.mark.parametrize("where", ["own local instance", "cluster address"])
def test_address_in_a_fresh_process(request, tmp_path, where):
    """A fresh process (as a user's script): with address=None segment_images starts a local
    instance and shuts it down after; with a cluster's "host:port" it connects to that cluster (here
    the module's instance) and only disconnects: the cluster keeps running."""
    import json
    import os
    import subprocess

    address = ""
    if where == "cluster address":
        address = request.getfixturevalue("local_ray").get_runtime_context().gcs_address
    (tmp_path / "in").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", _CHILD_SCRIPT, str(tmp_path / "in"), str(tmp_path / "out"), address],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"n": 3, "ok": True, "initialized_after": False}
    if address:
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == NUM_WORKERS + 1


# ---- the real pipeline: Segmenter and segment_video ----------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The default model's network (CompactSegNet) with fixed random weights, as a checkpoint file:
    every worker loads the same model whether or not the shipped weights are installed. BN
    statistics and the classifier are spread out so that the labels use several classes (equal
    labels could not tell the Ray path from a constant)."""
    from deconvseg_fast.models import save_checkpoint
    from deconvseg_fast.models.compact import compact_segnet

    torch.manual_seed(0)
    model = compact_segnet().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.05)
        model.classifier.weight.mul_(5)
    path = tmp_path_factory.mktemp("ckpt") / "compact.pt"
    save_checkpoint(model, path)
    return path


def test_images_segmenter_options_same_labels_as_local(local_ray, tmp_path):
    """segmenter_options without model/weights: every worker builds the shipped default model."""
    from deconvseg_fast.video.segmenter import Segmenter

    paths = _write_images(tmp_path / "in", [(72, 96)] * 5)
    options = {"crf": True, "crf_iterations": 2}
    out = D.segment_images(tmp_path / "in", tmp_path / "out", segmenter_options=options,
                           num_workers=NUM_WORKERS, batch_size=2, threads_per_worker=THREADS)
    local = Segmenter.from_options(**options)
    seen = set()
    for p in paths:
        got = D.read_label_png(out[str(p)])
        np.testing.assert_array_equal(got, _local_labels(local, p))
        seen |= set(np.unique(got).tolist())
    assert len(seen) > 1, f"labels use only the classes {seen}: the comparison would prove nothing"


def test_videos_same_labels_as_local(local_ray, checkpoint, tmp_path):
    """One whole video per task: the temporal CRF (window 2) sees every frame in order, so the labels
    are those of segment_video run locally on the same video."""
    from deconvseg_fast.models import load_checkpoint
    from deconvseg_fast.scenes import render_video
    from deconvseg_fast.video.io import write_clip
    from deconvseg_fast.video.pipeline import segment_video
    from deconvseg_fast.video.segmenter import Segmenter

    (tmp_path / "in").mkdir()
    clips = []
    for seed, frames in ((1, 7), (2, 5)):
        clip = render_video(seed, frames, 72, 96)
        path = tmp_path / "in" / f"clip{seed}.mp4"
        write_clip(path, clip.frames, clip.fps, audio=False)
        clips.append((path, frames))
    seg = Segmenter(load_checkpoint(checkpoint), crf=True, crf_iterations=2, temporal_window=2)
    out = D.segment_videos([p for p, _ in clips], tmp_path / "out", segmenter=seg, labels=True,
                           num_workers=NUM_WORKERS, threads_per_worker=THREADS, batch=3, progress=False)
    assert list(out) == [str(p) for p, _ in clips]
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for path, frames in clips:
            summary = out[str(path)]
            assert summary["frames"] == frames
            assert summary["output"] == str(tmp_path / "out" / (path.stem + ".mp4"))
            assert (tmp_path / "out" / (path.stem + ".mp4")).stat().st_size > 0
            ref_dir = tmp_path / "local" / path.stem
            segment_video(str(path), None, segmenter=seg, labels_out=ref_dir, batch=3, progress=False)
            got = sorted(p.name for p in (tmp_path / "out" / f"{path.stem}_labels").iterdir())
            assert got == [f"{i:06d}.png" for i in range(frames)]
            for name in got:
                np.testing.assert_array_equal(D.read_label_png(tmp_path / "out" / f"{path.stem}_labels" / name),
                                              D.read_label_png(ref_dir / name), err_msg=f"{path.name} {name}")
    finally:
        torch.set_num_threads(saved)


def test_video_options_that_name_worker_places_are_refused(tmp_path):
    with pytest.raises(ValueError, match="labels_out: not an option of segment_videos.*labels=True"):
        D.segment_videos(tmp_path / "x.mp4", tmp_path / "out", labels_out=tmp_path / "l")
    with pytest.raises(ValueError, match="output_dir: expected a folder"):
        D.segment_videos(tmp_path / "x.mp4", None)


# ---- bad arguments (no Ray work is started for any of them) ---------------------------------------
def test_missing_input_names_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"inputs: .*nope\.png.* does not exist"):
        D.segment_images([tmp_path / "nope.png"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="inputs: folder .* holds no image files"):
        D.segment_images(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"inputs: .*clip\.mp4.* does not exist"):
        D.segment_videos(tmp_path / "clip.mp4", tmp_path / "out")


def test_duplicate_stems_name_inputs(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / d / "x.png")
    with pytest.raises(ValueError, match="inputs: several inputs share the file name stem"):
        D.segment_images([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], tmp_path / "out")


@pytest.mark.parametrize("address", ["not an address", "host:", "localhost:99999", "http://x:1/"])
def test_malformed_address_names_address(tmp_path, address):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="address: expected None, 'auto', 'host:port'"):
        D.segment_images(tmp_path / "x.png", tmp_path / "out", address=address)


def test_unreachable_address_fails_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: bind, note it, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    t0 = time.perf_counter()
    with pytest.raises(D.DistributedError, match=f"address: no Ray cluster reachable at '127.0.0.1:{port}'"):
        D.segment_images(tmp_path / "x.png", tmp_path / "out", address=f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10  # not Ray's minute of GCS retries


def test_address_while_connected_names_address(local_ray, tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(D.DistributedError, match="address: this process is already connected"):
        D.segment_images(tmp_path / "x.png", tmp_path / "out", address="auto")
    assert ray.is_initialized()


@pytest.mark.parametrize("kwargs,match", [
    ({"num_workers": 0}, "num_workers: expected an int >= 1"),
    ({"batch_size": 0}, "batch_size: expected an int >= 1"),
    ({"cpus_per_worker": 0}, "cpus_per_worker: expected a number > 0"),
    ({"threads_per_worker": 0}, "threads_per_worker: expected None or an int >= 1"),
    ({"segmenter": TinySegmenter(), "segmenter_options": {}}, "segmenter, segmenter_options: give one"),
])
def test_bad_options_name_the_argument(tmp_path, kwargs, match):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=match):
        D.segment_images(tmp_path / "x.png", tmp_path / "out", **kwargs)


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(D.DistributedError, match=r"needs Ray Data.*pip install 'ray\[data\]'"):
        D.segment_images(tmp_path / "x.png", tmp_path / "out")
