"""The streaming pipeline on a Ray cluster: many image folders or videos, one pipeline per worker.

Two entry points, both built on Ray Data (``from_items`` + ``map_batches`` with a callable class
that holds one ``deconvseg_fast.video.segmenter.Segmenter`` per worker, run by an actor pool):

* :func:`segment_images` -- a folder (or a list) of images. Workers read the images, segment them
  in batches (images of one size per batch) and send back each label map as a PNG; the driver
  writes ``<output_dir>/<stem>.png`` (uint8, pixel value = class index) or, with
  ``output_dir=None``, returns the label arrays.
* :func:`segment_videos` -- a list (or a folder) of videos, **one whole video per task**: a worker
  runs :func:`deconvseg_fast.video.pipeline.segment_video` on it from the first frame to the last,
  so frame order is kept and the temporal CRF sees consecutive frames. The encoded output comes
  back to the driver, which writes ``<output_dir>/<stem><suffix>``.

Each worker runs exactly the local code path (the same ``Segmenter`` / ``segment_video``), so the
labels are the ones a local run with the same torch thread count gives (``threads_per_worker``;
the kernels are bit-reproducible for a fixed thread count).

Only the inputs must be readable from every worker (a shared filesystem, or the same files at the
same paths on every node); the outputs travel back through Ray's object store and are written on
the driver, so ``output_dir`` only has to exist where the driver runs.

Where it runs (``address``):

* ``None``: the Ray instance this process is already connected to (``ray.is_initialized()``), else
  the cluster named by the ``RAY_ADDRESS`` environment variable (as ``ray.init`` reads it), else a
  local instance started for this call and shut down after it;
* ``"auto"`` / ``"host:port"``: the running cluster at that address (checked with a plain TCP
  connect first, so a wrong address fails in seconds instead of Ray's minute of retries);
* ``"ray://host:port"``: Ray Client (needs ``ray[client]``).

On a cluster (three lines; the package must be installed on every node)::

    ray start --head                     # on the head node; `ray start --address=HEAD:6379` on the others
    from deconvseg_fast.distributed import segment_videos
    segment_videos(["/shared/a.mp4", "/shared/b.mp4"], "/out", address="auto", num_workers=8)

Why the local instance is started the way it is (see ``_start_local``): an actor pool that
reserves every logical CPU leaves no CPU for any Ray *task* in the same plan (a read, a write, a
repartition), and Ray Data then waits forever with the tasks "backpressured"; on a 2-core machine
``ray.init(num_cpus=2)`` + two 1-CPU actors is exactly that deadlock. The local instance therefore
declares one logical CPU more than the workers reserve, and the dataset is built from in-memory
items (no read tasks at all), with the reading done inside the workers. (The "dashboard_agent
failed and raylet fate-shares with it" line that such a hung run leaves in raylet.out comes from
killing it -- the agent exits on the SIGTERM and the raylet follows -- not from the agent.) The
dashboard is not started (nothing here uses it); Ray Data's progress bars are off during a call.
A local instance starts in 2-7 s on a 2-core machine and each call's actors in a few more.
"""
from __future__ import annotations

import io
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".ts")


class DistributedError(RuntimeError):
    """A distributed run that could not start or finish (Ray missing, cluster unreachable)."""


# ---- Ray ------------------------------------------------------------------------------------------
def _import_ray():
    """Ray is optional: imported here, not at module import, with an error saying how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Core without Ray Data is not enough
    except ImportError as e:
        raise DistributedError(
            "deconvseg_fast.distributed needs Ray Data, which is not installed "
            f"({type(e).__name__}: {e}); install it with: pip install 'ray[data]'") from e
    return ray


def _check_address(address: str) -> None:
    """Fail fast and clearly on an address no Ray cluster can be behind."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address: expected None, 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in hostport:
        raise ValueError(f"address: expected None, 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    try:
        # Ray itself keeps retrying an unreachable GCS for about a minute before giving up.
        socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
    except OSError as e:
        raise DistributedError(f"address: no Ray cluster reachable at {address!r} "
                               f"({type(e).__name__}: {e})") from e


def _start_local(ray, num_workers: int, cpus_per_worker: float) -> None:
    # One logical CPU beyond what the actor pool reserves: see the module docstring (deadlock of an
    # actor pool holding every CPU while a task of the same plan waits for one).
    num_cpus = math.ceil(num_workers * cpus_per_worker) + 1
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - any start-up failure becomes one clear error
        raise DistributedError(f"could not start a local Ray instance with {num_cpus} CPUs "
                               f"({type(e).__name__}: {e}); logs are under /tmp/ray/session_latest/logs") from e


class _Connection:
    """Context manager: connect (or start a local instance), and undo only what it did."""

    def __init__(self, address: str | None, num_workers: int, cpus_per_worker: float):
        self.address, self.num_workers, self.cpus_per_worker = address, num_workers, cpus_per_worker
        self.started = False

    def __enter__(self):
        ray = _import_ray()
        if self.address is None and not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            self.address = os.environ["RAY_ADDRESS"]  # as ray.init does: the cluster it names
        if self.address is None:
            if not ray.is_initialized():
                _start_local(ray, self.num_workers, self.cpus_per_worker)
                self.started = True
        else:
            _check_address(self.address)
            if ray.is_initialized():
                raise DistributedError(
                    f"address: this process is already connected to a Ray instance; pass address=None "
                    f"to use it, or call ray.shutdown() before connecting to {self.address!r}")
            try:
                ray.init(address=self.address, configure_logging=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001
                raise DistributedError(f"address: could not connect to Ray at {self.address!r} "
                                       f"({type(e).__name__}: {e})") from e
            self.started = True
        import warnings
        with warnings.catch_warnings():  # Ray Data's own defaults trip its deprecation checks
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx = ray.data.DataContext.get_current()
        # Quiet for this call only (the caller's own Ray Data settings come back after it).
        self.saved = {k: getattr(self.ctx, k) for k in ("enable_progress_bars", "print_on_execution_start")}
        for k in self.saved:
            setattr(self.ctx, k, False)
        self.ray = ray
        return ray

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.ctx, k, v)
        if self.started:
            self.ray.shutdown()
        return False


# ---- workers (one instance per actor) ------------------------------------------------------------
def _build_segmenter(segmenter: Any, segmenter_options: Mapping[str, Any] | None):
    if segmenter is not None:
        return segmenter
    from deconvseg_fast.video.segmenter import Segmenter
    # from_options: `model` / `weights` name the network (default: the shipped demo model), the
    # other keys are Segmenter's (crf, crf_iterations, crf_params, temporal_window, device, half).
    return Segmenter.from_options(**dict(segmenter_options or {}))


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """The [H, W] uint8 label map of a PNG written by :func:`segment_images`."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.uint8)


class _ImageWorker:
    """Holds one segmenter for the life of the actor; segments a batch of image paths."""

    def __init__(self, segmenter, segmenter_options, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.segmenter = _build_segmenter(segmenter, segmenter_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        frames = [_read_rgb(p) for p in paths]
        labels: list[np.ndarray | None] = [None] * len(frames)
        by_shape: dict[tuple, list[int]] = {}
        for i, f in enumerate(frames):  # the segmenter takes [B, H, W, 3]: one call per size
            by_shape.setdefault(f.shape, []).append(i)
        for idx in by_shape.values():
            out = np.asarray(self.segmenter(np.stack([frames[i] for i in idx])))
            for j, i in enumerate(idx):
                labels[i] = out[j]
        pngs = np.empty(len(paths), dtype=object)
        pngs[:] = [_png_bytes(lab) for lab in labels]
        return {"path": np.array(paths, dtype=object), "png": pngs}


class _VideoWorker:
    """Holds one segmenter; runs the whole local video pipeline on each video it is given."""

    def __init__(self, segmenter, segmenter_options, threads: int, options: dict, suffix: str,
                 labels: bool):
        import torch
        torch.set_num_threads(threads)
        self.segmenter = _build_segmenter(segmenter, segmenter_options)
        self.options, self.suffix, self.labels = options, suffix, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json
        import zipfile

        from deconvseg_fast.video.pipeline import segment_video

        inputs = [str(p) for p in batch["path"]]
        data, label_zips = np.empty(len(inputs), dtype=object), np.empty(len(inputs), dtype=object)
        summaries = []
        for k, path in enumerate(inputs):
            with tempfile.TemporaryDirectory(prefix="deconvseg_video_") as d:
                out = Path(d) / (Path(path).stem + self.suffix)
                labels_dir = Path(d) / "labels" if self.labels else None
                summary = segment_video(path, str(out), segmenter=self.segmenter, labels_out=labels_dir,
                                        **self.options)
                data[k] = out.read_bytes()
                buf = io.BytesIO()
                if labels_dir is not None:  # the per-frame PNGs travel back as one stored zip
                    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                        for f in sorted(labels_dir.iterdir()):
                            z.write(f, f.name)
                label_zips[k] = buf.getvalue()
            summaries.append(json.dumps(summary, default=str))
        return {"path": np.array(inputs, dtype=object), "data": data, "labels": label_zips,
                "summary": np.array(summaries, dtype=object)}


# ---- inputs ---------------------------------------------------------------------------------------
def _collect(inputs, extensions: tuple[str, ...], what: str) -> list[str]:
    """Files named by `inputs` (a folder, a file, or an iterable of files), sorted for folders."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in extensions)
            if not found:
                raise FileNotFoundError(f"inputs: folder {str(p)!r} holds no {what} "
                                        f"(extensions {', '.join(extensions)})")
            paths += found
        elif p.is_file():
            paths.append(str(p))
        else:
            raise FileNotFoundError(f"inputs: {str(p)!r} does not exist")
    if not paths:
        raise ValueError(f"inputs: expected at least one {what} (a folder or a list of files), got none")
    stems = [Path(p).stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"inputs: several inputs share the file name stem(s) {dup}; their outputs "
                         f"would overwrite each other in output_dir")
    return [os.path.abspath(p) for p in paths]


def _check_common(num_workers: int, batch_size: int, cpus_per_worker: float, segmenter, segmenter_options):
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker: expected a number > 0, got {cpus_per_worker!r}")
    if segmenter is not None and segmenter_options is not None:
        raise ValueError("segmenter, segmenter_options: give one of them (a segmenter to ship to the "
                         "workers, or the options each worker builds its own Segmenter from), not both")


def _threads(threads_per_worker: int | None, cpus_per_worker: float) -> int:
    if threads_per_worker is None:
        return max(1, int(cpus_per_worker))
    if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker: expected None or an int >= 1, got {threads_per_worker!r}")
    return threads_per_worker


# ---- public API -----------------------------------------------------------------------------------
def segment_images(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   output_dir: str | os.PathLike | None, *,
                   segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
                   segmenter_options: Mapping[str, Any] | None = None,
                   num_workers: int = 2, batch_size: int = 4, cpus_per_worker: float = 1.0,
                   threads_per_worker: int | None = None,
                   address: str | None = None) -> dict[str, Any]:
    """Segment every image of `inputs` on a Ray cluster.

    inputs: a folder (its image files, sorted by name), an image file, or an iterable of folders and
        files. File name stems must be unique (they name the outputs).
    output_dir: where ``<stem>.png`` label maps (uint8, value = class index) are written (created if
        missing); None returns the label arrays instead.
    segmenter: a callable ``frames uint8 [B, H, W, 3] -> labels uint8 [B, H, W]`` (normally a
        ``deconvseg_fast.video.segmenter.Segmenter``), pickled to every worker.
    segmenter_options: instead of `segmenter`, keyword arguments from which each worker builds its
        own segmenter with ``Segmenter.from_options(**segmenter_options)`` (nothing large is
        pickled): ``model`` / ``weights`` as the CLI's ``--model`` / ``--weights`` (default: the
        shipped demo model), plus ``Segmenter``'s ``crf``, ``crf_iterations``, ``crf_params``,
        ``temporal_window``, ``device``, ``half``. Neither: the demo model without CRF.
    num_workers: size of the actor pool (one segmenter each).
    batch_size: images per segmenter call (a batch is split by image size).
    cpus_per_worker: logical CPUs each worker reserves on the cluster.
    threads_per_worker: torch threads in each worker (default: ``int(cpus_per_worker)``, at least 1).
    address: see the module docstring (None: the current or a fresh local Ray instance).

    Returns ``{input path: output path}`` (or ``{input path: labels [H, W] uint8}`` when
    `output_dir` is None), in input order.
    """
    _check_common(num_workers, batch_size, cpus_per_worker, segmenter, segmenter_options)
    threads = _threads(threads_per_worker, cpus_per_worker)
    paths = _collect(inputs, IMAGE_EXTENSIONS, "image files")
    out_dir = None if output_dir is None else Path(output_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with _Connection(address, num_workers, cpus_per_worker) as ray:
        # One block per batch, so that every worker gets work from the start.
        blocks = max(1, math.ceil(len(paths) / batch_size))
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        ds = ds.map_batches(_ImageWorker, batch_size=batch_size, batch_format="numpy",
                            fn_constructor_args=(segmenter, segmenter_options, threads),
                            # no more workers than batches: an idle actor still loads a model
                            compute=ray.data.ActorPoolStrategy(size=min(num_workers, blocks)),
                            num_cpus=cpus_per_worker)
        results: dict[str, Any] = {}
        for row in ds.iter_rows():
            path, png = str(row["path"]), bytes(row["png"])
            if out_dir is None:
                from PIL import Image
                results[path] = np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8)
            else:
                target = out_dir / (Path(path).stem + ".png")
                target.write_bytes(png)
                results[path] = str(target)
    missing = [p for p in paths if p not in results]
    if missing:
        raise DistributedError(f"the Ray run returned no result for {len(missing)} input(s), e.g. {missing[0]!r}")
    return {p: results[p] for p in paths}


def segment_videos(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   output_dir: str | os.PathLike, *,
                   segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
                   segmenter_options: Mapping[str, Any] | None = None,
                   num_workers: int = 2, cpus_per_worker: float = 1.0,
                   threads_per_worker: int | None = None, suffix: str = ".mp4", labels: bool = False,
                   address: str | None = None, **options) -> dict[str, dict]:
    """Run :func:`deconvseg_fast.video.pipeline.segment_video` on every video, one whole video per
    Ray task (frame order kept; the temporal CRF sees consecutive frames).

    inputs: a video file, a folder (its video files, sorted), or an iterable of both; stems unique.
    output_dir: ``<stem><suffix>`` per video (the overlay video) is written here (created if
        missing), on the driver.
    labels: also write each frame's label map, as ``segment_video(labels_out=...)`` does, to
        ``<output_dir>/<stem>_labels/<index:06d>.png`` (uint8, value = class id, 255 = none).
    options: passed unchanged to ``segment_video`` (``batch``, ``max_frames``, ``resize``, ``alpha``,
        ``legend``, ``codec``, ...); not ``output``/``labels_out``/``on_labels``, which name places
        or callbacks on the worker.
    The other arguments are those of :func:`segment_images`.

    Returns ``{input path: summary}``, the summary being ``segment_video``'s dict (sent back as
    JSON, so values that are not JSON become strings) with ``"output"`` set to the written video
    and, with `labels`, ``"labels_dir"`` to the label folder.
    """
    import json

    if output_dir is None:
        raise ValueError("output_dir: expected a folder for the output videos, got None")
    _check_common(num_workers, 1, cpus_per_worker, segmenter, segmenter_options)
    threads = _threads(threads_per_worker, cpus_per_worker)
    if not isinstance(suffix, str) or not suffix.startswith("."):
        raise ValueError(f"suffix: expected a file extension such as '.mp4', got {suffix!r}")
    for key in ("output", "labels_out", "on_labels"):
        if key in options:
            raise ValueError(f"{key}: not an option of segment_videos (the output goes to output_dir"
                             f"{'; label maps: labels=True' if key == 'labels_out' else ''})")
    paths = _collect(inputs, VIDEO_EXTENSIONS, "video files")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Connection(address, num_workers, cpus_per_worker) as ray:
        # batch_size=1 and one block per video: a task is one whole video, never a slice of one.
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        ds = ds.map_batches(_VideoWorker, batch_size=1, batch_format="numpy",
                            fn_constructor_args=(segmenter, segmenter_options, threads, dict(options), suffix,
                                                 bool(labels)),
                            compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(paths))),
                            num_cpus=cpus_per_worker)
        results: dict[str, dict] = {}
        for row in ds.iter_rows():
            path = str(row["path"])
            target = out_dir / (Path(path).stem + suffix)
            target.write_bytes(bytes(row["data"]))
            summary = json.loads(str(row["summary"]))
            summary = summary if isinstance(summary, dict) else {"result": summary}
            summary["output"] = str(target)
            if labels:
                import zipfile

                labels_dir = out_dir / (Path(path).stem + "_labels")
                labels_dir.mkdir(exist_ok=True)
                with zipfile.ZipFile(io.BytesIO(bytes(row["labels"]))) as z:
                    z.extractall(labels_dir)
                summary["labels_dir"] = str(labels_dir)
            results[path] = summary
    missing = [p for p in paths if p not in results]
    if missing:
        raise DistributedError(f"the Ray run returned no result for {len(missing)} input(s), e.g. {missing[0]!r}")
    return {p: results[p] for p in paths}


__all__ = ["segment_images", "segment_videos", "read_label_png", "DistributedError",
           "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS"]
