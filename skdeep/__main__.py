"""Command line: ``python -m skdeep extract INPUT --out features.joblib``.

Writes one joblib dump (a dict) with the features, the image paths, the labels taken
from sub-folder names, the feature names and the extractor's parameters::

    python -m skdeep extract photos/ --layers layer3 layer4 --out features.joblib
    python -c "import joblib; d = joblib.load('features.joblib'); print(d['features'].shape)"
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import joblib
import numpy as np

from .backbones import WeightsUnavailableError
from .feature_extraction import FeatureExtractor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def find_images(source: str) -> tuple[list[str], list[str] | None]:
    """Image files of a folder (recursive) or a glob pattern, and their labels.

    Labels are the names of the first-level sub-folders of a folder, when every
    image lies in one; otherwise there are none.
    """
    if os.path.isdir(source):
        root = Path(source)
        paths = sorted(
            str(path) for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
        )
        parts = [Path(path).relative_to(root).parts for path in paths]
        labels = [p[0] for p in parts] if parts and all(len(p) > 1 for p in parts) else None
        return paths, labels
    paths = sorted(
        path
        for path in glob.glob(source, recursive=True)
        if os.path.isfile(path) and Path(path).suffix.lower() in IMAGE_SUFFIXES
    )
    return paths, None


def load_npy(path: str) -> np.ndarray:
    """Memory-map a .npy array of images (never unpickling it)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays can be neither mapped nor safely loaded
        raise ValueError(
            f"INPUT: {path} holds Python objects (an array of dtype object), not pixels; "
            "expected a numeric array of images (n, H, W[, C]) as np.save(path, images) "
            "writes"
        ) from exc
    except OSError as exc:
        raise OSError(f"INPUT: could not read {path} as a .npy file: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m skdeep``."""
    parser = argparse.ArgumentParser(
        prog="python -m skdeep",
        description="Deep transfer learning with a scikit-learn face.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser(
        "extract",
        help="extract CNN features of images into a joblib dump",
        description=(
            "Run a frozen pretrained CNN over images and write one joblib dump: a dict "
            "with 'features' (n, d) float32, 'paths', 'labels' (sub-folder names, or "
            "None), 'feature_names' and 'params'."
        ),
    )
    extract.add_argument(
        "input",
        help="a folder of images (searched recursively; first-level sub-folder names "
        "become labels), a quoted glob such as 'data/**/*.jpg', or a .npy array of "
        "images (n, H, W[, C])",
    )
    extract.add_argument("--out", required=True, help="output file, e.g. features.joblib")
    extract.add_argument("--backbone", default="mobilenet_v2", help="torchvision model name")
    extract.add_argument(
        "--weights",
        default="IMAGENET1K_V1",
        help="torchvision weights name, a state_dict file, or 'none' for random weights",
    )
    extract.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="module names to tap (default: penultimate, the classifier's input)",
    )
    extract.add_argument(
        "--pooling", default="avg", choices=["avg", "max", "avgmax", "none"], help="pooling"
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
        "--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    extract.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def extract(args: argparse.Namespace) -> dict:
    """Run ``extract``: features of the INPUT images, written to ``--out``."""
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
        verbose=not args.quiet,
    )
    features = extractor.fit_transform(images)
    dump = {
        "features": features,
        "paths": paths,
        "labels": None if labels is None else np.asarray(labels),
        "feature_names": extractor.get_feature_names_out(),
        "params": extractor.get_params(),
    }
    joblib.dump(dump, args.out)
    return dump


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    try:
        dump = extract(args)
    except (ValueError, TypeError, OSError, WeightsUnavailableError) as exc:
        print(f"skdeep: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        n, d = dump["features"].shape
        print(f"wrote {n} x {d} features to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
