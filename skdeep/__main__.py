"""Command line: ``python -m skdeep extract`` and ``python -m skdeep cache``.

``extract`` runs a frozen pretrained CNN over images. With ``--out features.zarr`` it
writes a chunked feature store while it computes, resumable after an interruption,
in this process or on a Dask cluster (``--workers N``, ``--scheduler ADDRESS``); open
it with :func:`skdeep.load_features`. With ``--out features.joblib`` it writes one
joblib dump (a dict) at the end, for small jobs::

    python -m skdeep extract photos/ --layers layer3 layer4 --out features.zarr --workers 4
    python -m skdeep extract photos/ --out features.joblib
    python -m skdeep cache info feature-cache/
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import threading
from pathlib import Path

# Imported without torch, so that --help and `cache` answer at once; extraction imports
# torch, scikit-learn and the network when it starts (see extract).
from ._feature_cache import FeatureCache

# The poolings of skdeep._layouts.POOLINGS (a test keeps the two equal), with None as "none".
POOLING_CHOICES = ("avg", "max", "avgmax", "cls", "mean", "cls+mean", "none")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
STORE_SUFFIX = ".zarr"


def find_images(source: str) -> tuple[list[str], list[str] | None]:
    """Find the image files of a folder (recursive) or a glob pattern, and their labels.

    Labels are the names of the first-level sub-folders of a folder, when every
    image lies in one; otherwise there are none. Symbolic links to files count;
    links to folders are not followed.
    """
    if os.path.isdir(source):
        # os.walk rather than Path.rglob: a million files take seconds, not minutes.
        found = []
        for folder, _, names in os.walk(source):
            relative = os.path.relpath(folder, source)
            found += [
                (os.path.join(folder, name), relative)
                for name in names
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            ]
        found.sort()
        paths = [path for path, _ in found]
        in_sub_folders = found and all(folder != os.curdir for _, folder in found)
        labels = [folder.split(os.sep, 1)[0] for _, folder in found] if in_sub_folders else None
        return paths, labels
    paths = sorted(
        path
        for path in glob.glob(source, recursive=True)
        if os.path.isfile(path) and Path(path).suffix.lower() in IMAGE_SUFFIXES
    )
    return paths, None


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m skdeep``."""
    parser = argparse.ArgumentParser(
        prog="python -m skdeep",
        description="Deep transfer learning with a scikit-learn face.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_extract(commands)
    cache = commands.add_parser(
        "cache",
        help="inspect or empty a per-image feature cache (FeatureExtractor(memory=...))",
    )
    cache.add_argument("action", choices=["info", "clear"], help="report its size, or empty it")
    cache.add_argument("folder", help="the folder given as memory=")
    return parser


def _add_extract(commands) -> None:
    extract = commands.add_parser(
        "extract",
        help="extract CNN features of images into a feature store or a joblib dump",
        description=(
            "Run a frozen pretrained CNN over images. --out NAME.zarr writes a chunked "
            "feature store as it computes (resumable: run the same command again after "
            "an interruption; read it with skdeep.load_features); any other --out writes "
            "one joblib dump at the end: a dict with 'features' (n, d) float32, 'paths', "
            "'labels' (sub-folder names, or None), 'feature_names' and 'params'."
        ),
    )
    extract.add_argument(
        "input",
        help="a folder of images (searched recursively; first-level sub-folder names "
        "become labels), a quoted glob such as 'data/**/*.jpg', or a .npy array of "
        "images (n, H, W[, C])",
    )
    extract.add_argument(
        "--out", required=True, help="output: features.zarr (a store) or features.joblib"
    )
    extract.add_argument(
        "--overwrite", action="store_true", help="replace an existing output of other settings"
    )
    extract.add_argument(
        "--backbone",
        default="mobilenet_v2",
        help="torchvision model name, or timm:<name> for a timm model",
    )
    extract.add_argument(
        "--weights",
        default="IMAGENET1K_V1",
        help="weights name (IMAGENET1K_V1, DEFAULT; for timm, the tag's), a state_dict file, "
        "or 'none' for random weights",
    )
    extract.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="module names to tap (default: penultimate, the classifier's input; for timm "
        "models also intermediate:N, the N-th of feature_info)",
    )
    extract.add_argument(
        "--pooling",
        default="avg",
        choices=POOLING_CHOICES,
        help="how each layer becomes columns: avg, max, avgmax for maps; cls, mean, cls+mean "
        "for the tokens of transformers; none flattens",
    )
    extract.add_argument("--image-size", type=int, default=None, help="network input size")
    extract.add_argument(
        "--image-shape", type=int, nargs="+", default=None, help="H W [C] of flat .npy rows"
    )
    extract.add_argument(
        "--value-range", type=float, nargs=2, default=None, help="LOW HIGH pixel values"
    )
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    extract.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "int8"],
        help="int8: quantized on the CPU, calibrated on up to 256 of the INPUT images",
    )
    extract.add_argument(
        "--num-workers", type=int, default=0, help="image decoding processes (in this process)"
    )
    extract.add_argument(
        "--random-state", type=int, default=None, help="seed of random weights (--weights none)"
    )
    cluster = extract.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=int,
        default=None,
        help=(
            "start a local Dask cluster of this many single-threaded workers (.zarr only); "
            "with --device cuda, one per GPU"
        ),
    )
    cluster.add_argument(
        "--scheduler", default=None, help="address of a running Dask scheduler (.zarr only)"
    )
    extract.add_argument(
        "--partition-size",
        type=int,
        default=1024,
        help="images per task and per chunk of the store (.zarr only)",
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bar")


# Options that take a count: the smallest value each accepts.
_COUNTS = {
    "batch_size": 1,
    "image_size": 1,
    "num_workers": 0,
    "workers": 1,
    "partition_size": 1,
    "random_state": 0,
}


def check_options(args: argparse.Namespace) -> None:
    """Check the values of ``extract``'s options; name the option in any error.

    Raises
    ------
    ValueError
        A count below its minimum, an image shape that is not H W or H W C, or a value
        range that is not two finite numbers, low below high.
    """
    for name, lowest in _COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < lowest:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} must be an integer of {lowest} or more; got {value}")
    shape = args.image_shape
    if shape is not None and (
        len(shape) not in (2, 3) or min(shape[:2]) < 1 or shape[2:] not in ([], [1], [3])
    ):
        raise ValueError(
            "--image-shape takes H W or H W C (positive H and W, C 1 or 3); got "
            + " ".join(map(str, shape))
        )
    if args.value_range is not None:
        low, high = args.value_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"--value-range takes LOW HIGH, two finite numbers with LOW < HIGH; got "
                f"{low:g} {high:g}"
            )


def worker_gpus(args: argparse.Namespace) -> list[int] | None:
    """Return the GPU of each ``--workers`` worker with ``--device cuda`` (None on a CPU).

    One worker per GPU: worker ``i`` sees only GPU ``i``, as its ``cuda`` device.

    Raises
    ------
    ValueError
        ``--device cuda:N`` with ``--workers`` (each worker has its own GPU, as ``cuda``).
    """
    if args.workers is None or not args.device.startswith("cuda"):
        return None
    if args.device != "cuda":
        raise ValueError(
            f"--device {args.device} with --workers: each worker takes a GPU of its own "
            "(worker i sees GPU i as its only one); use --device cuda"
        )
    return list(range(args.workers))


def check_worker_gpus(gpus: list[int] | None) -> None:
    """Check that this machine has a GPU for each worker (torch imported by then).

    Raises
    ------
    ValueError
        More workers than GPUs.
    """
    import torch

    if gpus is not None and len(gpus) > torch.cuda.device_count():
        raise ValueError(
            f"--workers {len(gpus)} with --device cuda puts each worker on a GPU of its own, "
            f"but this machine has {torch.cuda.device_count()} GPU(s)"
        )


def extract(args: argparse.Namespace, cluster: _EarlyCluster | None = None) -> dict:
    """Run ``extract``: features of the INPUT images, written to ``--out``.

    ``cluster`` is the local cluster ``--workers`` asked for, already starting.

    Returns
    -------
    dict
        What was written: ``n_images``, ``n_features`` and, for joblib dumps, the dump.
    """
    import joblib
    import numpy as np

    from ._images import load_npy
    from .feature_extraction import FeatureExtractor

    check_options(args)
    if args.input.endswith(".npy"):
        images = load_npy(args.input)
        paths, labels = None, None
    else:
        paths, labels = find_images(args.input)
        if not paths:
            raise ValueError(f"INPUT: no image files found in {args.input!r}")
        images = paths
    extractor = FeatureExtractor(
        backbone=args.backbone,
        weights=None if args.weights.lower() == "none" else args.weights,
        layers=args.layers,
        pooling=None if args.pooling == "none" else args.pooling,
        image_size=args.image_size,
        image_shape=tuple(args.image_shape) if args.image_shape else None,
        value_range=tuple(args.value_range) if args.value_range else None,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
        random_state=args.random_state,
        verbose=not args.quiet,
    )
    if args.out.rstrip("/").endswith(STORE_SUFFIX):
        return _extract_to_store(args, extractor, paths, labels, cluster)
    if args.workers is not None or args.scheduler is not None:
        raise ValueError(
            f"--workers and --scheduler write a feature store: use --out NAME{STORE_SUFFIX}"
        )
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out: {args.out!r} exists; pass --overwrite to replace it")
    features = extractor.fit_transform(images)
    dump = {
        "features": features,
        "paths": paths,
        "labels": None if labels is None else np.asarray(labels),
        "feature_names": extractor.get_feature_names_out(),
        "params": extractor.get_params(),
    }
    try:
        joblib.dump(dump, args.out)
    except OSError as exc:
        raise OSError(f"--out: cannot write {args.out!r}: {exc}") from exc
    return {"n_images": len(features), "n_features": features.shape[1], "dump": dump}


def _extract_to_store(args, extractor, paths, labels, cluster: _EarlyCluster | None) -> dict:
    from . import dask as skdeep_dask
    from ._images import load_npy

    if cluster is not None:
        check_worker_gpus(cluster.gpus)
    # Fitted on the images: int8 calibrates on them. The store's progress bar counts.
    extractor.set_params(verbose=False).fit(paths if paths is not None else load_npy(args.input))
    client = None
    if args.scheduler is not None:
        from distributed import Client

        client = Client(args.scheduler)
    elif cluster is not None:
        client = cluster.client()
    try:
        store = skdeep_dask.extract(
            extractor,
            paths if paths is not None else args.input,
            args.out,
            labels=labels,
            client=client,
            n_workers=0 if client is None else None,
            partition_size=args.partition_size,
            overwrite=args.overwrite,
            verbose=not args.quiet,
        )
    finally:
        if client is not None and cluster is None:
            client.close()
    return {"n_images": store.n_images, "n_features": store.n_features}


class _EarlyCluster:
    """A local cluster started in a thread at once, while this process imports torch.

    Its workers import skdeep's extractor (torch, torchvision) as they start, in
    parallel with this process, instead of before their first task.
    """

    PRELOAD = ("skdeep.feature_extraction",)

    def __init__(self, n_workers: int, gpus: list[int] | None = None):
        self.n_workers = n_workers
        self.gpus = gpus
        self.cluster = self._client = self._error = None
        self._thread = threading.Thread(target=self._start, name="skdeep-cluster", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from ._cluster import local_cluster

            self.cluster = local_cluster(self.n_workers, gpus=self.gpus, preload=list(self.PRELOAD))
        except BaseException as exc:  # raised where the cluster is asked for
            self._error = exc

    def client(self):
        """Wait for the cluster; return a client of it."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        from distributed import Client

        self._client = Client(self.cluster)
        return self._client

    def close(self) -> None:
        """Close the client and the cluster (waiting for it to have started)."""
        self._thread.join()
        for part in (self._client, self.cluster):
            if part is not None:
                part.close()


def cache(args: argparse.Namespace) -> str:
    """Run ``cache info`` or ``cache clear``; return the report."""
    if not os.path.isdir(args.folder):
        raise ValueError(f"FOLDER: {args.folder!r} is not a folder")
    feature_cache = FeatureCache(args.folder)
    if args.action == "clear":
        freed = feature_cache.clear()
        return f"cleared {args.folder}: {freed / 2**20:.1f} MiB freed"
    info = feature_cache.info()
    lines = [
        f"{args.folder}: {info['images']} cached feature rows of {len(info['settings'])} "
        f"extractor setting(s), {info['bytes'] / 2**20:.1f} MiB"
    ]
    for key, count in info["settings"].items():
        lines.append(f"  {key}: {count} rows")
    return "\n".join(lines)


def _is_user_error(error: Exception) -> bool:
    """Whether ``error`` is one a user can cause and fix (printed without a traceback)."""
    kinds: tuple[type, ...] = (ValueError, TypeError, OSError, ImportError)
    weights = sys.modules.get("skdeep._weights")  # imported only if a network was built
    if weights is not None:
        kinds += (weights.WeightsUnavailableError, weights.WeightsChangedError)
    return isinstance(error, kinds)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    cluster = None
    try:
        if args.command == "cache":
            print(cache(args))
            return 0
        check_options(args)  # before a cluster starts for --workers
        to_store = args.out.rstrip("/").endswith(STORE_SUFFIX)
        if to_store and args.workers is not None and args.scheduler is None:
            # starts while torch is imported
            cluster = _EarlyCluster(args.workers, worker_gpus(args))
        written = extract(args, cluster)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"skdeep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "skdeep: interrupted; a .zarr store keeps its finished chunks: run the same "
            "command again to compute only the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        if cluster is not None:
            cluster.close()
    if not args.quiet:
        print(
            f"wrote {written['n_images']} x {written['n_features']} features to {args.out}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
