"""Tests of the Dask integration: lazy transforms, ParallelPostFit, clusters, stores.

The clusters listen on 127.0.0.1 only and are closed by the fixtures.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from skdeep import FeatureExtractor, load_features
from skdeep import dask as skdeep_dask
from skdeep.__main__ import main
from skdeep._store import open_store

from .conftest import InterruptingNet, SlowNet, TinyNet

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
pytest.importorskip("zarr")


def small_extractor(**params):
    """Return a fitted FeatureExtractor on a random ResNet-18 at 32 px, in float32."""
    defaults = dict(
        backbone="resnet18",
        weights=None,
        image_size=32,
        random_state=0,
        precision="float32",
        batch_size=4,
    )
    return FeatureExtractor(**{**defaults, **params}).fit()


@pytest.fixture
def photos(tmp_path):
    """Forty random 32x32 PNG files."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for index in range(40):
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def local_cluster(n_workers=2):
    """Start a cluster of single-threaded worker processes on the loopback interface."""
    return skdeep_dask.local_cluster(n_workers)


@pytest.fixture(scope="module")
def client():
    """Connect a Client to a two-worker local cluster shared by this module's tests."""
    with local_cluster() as cluster, distributed.Client(cluster) as connected:
        yield connected


def test_transform_of_a_dask_array_is_lazy_with_the_same_row_chunks(images):
    """A Dask array gives a lazy Dask array of features with the row chunks of X."""
    extractor = FeatureExtractor(TinyNet(), image_size=24, precision="float32").fit()
    TinyNet.images_seen = 0
    X = da.from_array(images, chunks=(5, 16, 16, 3))
    features = extractor.transform(X)
    assert isinstance(features, da.Array)
    assert features.chunks == ((5, 5, 2), (16,)) and features.dtype == np.float32
    assert TinyNet.images_seen == 0  # nothing computed yet
    computed = features.compute(scheduler="threads")
    assert TinyNet.images_seen == 12
    np.testing.assert_array_equal(computed, extractor.transform(images))


def test_parallel_post_fit_maps_flat_rows(images):
    """dask-ml's ParallelPostFit maps blocks of flat rows through image_shape."""
    wrappers = pytest.importorskip("dask_ml.wrappers")
    flat = images.reshape(len(images), -1)
    extractor = small_extractor(image_shape=(32, 32, 3))
    wrapped = wrappers.ParallelPostFit(
        extractor, transform_meta=np.empty((0, 512), dtype=np.float32)
    ).fit(flat)
    lazy = wrapped.transform(da.from_array(flat, chunks=(4, -1)))  # whole batches
    assert isinstance(lazy, da.Array)
    expected = small_extractor(image_shape=(32, 32, 3)).transform(flat)
    np.testing.assert_array_equal(lazy.compute(scheduler="threads"), expected)


def test_local_clusters_listen_on_loopback_and_keep_malloc_untrimmed(client):
    """Start clusters on 127.0.0.1, without Dask's MALLOC_TRIM_THRESHOLD_."""
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    environment = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert set(environment.values()) == {None}


def test_gpu_workers_each_see_their_own_gpu():
    """gpus=[0, 1]: two workers, each with CUDA_VISIBLE_DEVICES naming its GPU alone.

    The placement is what a GPU machine needs; it is checked here on the CPU, where
    the workers see no GPU at all.
    """
    with (
        skdeep_dask.local_cluster(gpus=[0, 1]) as cluster,
        distributed.Client(cluster) as connected,
    ):
        assert connected.scheduler.address.startswith("tcp://127.0.0.1:")
        seen = connected.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = connected.nthreads()
    assert sorted(seen.values()) == ["0", "1"]
    assert set(threads.values()) == {1}
    with pytest.raises(ValueError, match=r"n_workers=3 with gpus=\[0, 1\]: one worker per GPU"):
        skdeep_dask.local_cluster(3, gpus=[0, 1])
    with pytest.raises(ValueError, match=r"gpus must list distinct GPU indices.*\[1, 1\]"):
        skdeep_dask.local_cluster(gpus=[1, 1])


def test_gpu_indices_count_the_gpus_this_process_sees(monkeypatch):
    """A job narrowed to GPUs 2 and 3: worker 0 gets GPU 2, worker 1 GPU 3."""
    from skdeep._cluster import gpu_worker_specs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    specs = gpu_worker_specs([0, 1])
    assert [spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for spec in specs.values()] == [
        "2",
        "3",
    ]
    with pytest.raises(ValueError, match=r"sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES='2,3'\)"):
        gpu_worker_specs([0, 2])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_worker_specs([1])["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_the_command_line_puts_each_worker_on_its_own_gpu(monkeypatch):
    """--device cuda --workers 2: GPUs 0 and 1; cuda:N or more workers than GPUs: refused."""
    import argparse

    import torch

    from skdeep.__main__ import check_worker_gpus, worker_gpus

    def args(device, workers):
        return argparse.Namespace(device=device, workers=workers)

    assert worker_gpus(args("cuda", 2)) == [0, 1]
    assert worker_gpus(args("cpu", 2)) is None and worker_gpus(args("cuda", None)) is None
    with pytest.raises(ValueError, match=r"--device cuda:1 with --workers.*use --device cuda"):
        worker_gpus(args("cuda:1", 2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--workers 2 with --device cuda .* has 1 GPU"):
        check_worker_gpus([0, 1])
    check_worker_gpus([0])


def test_workers_start_with_the_extractor_imported():
    """The fork server imports skdeep's extractor once; fresh workers start with it."""
    with local_cluster(1) as cluster, distributed.Client(cluster) as connected:
        imported = connected.run(lambda: "skdeep.feature_extraction" in sys.modules)
    assert list(imported.values()) == [True]


def test_unpickling_is_cheap_and_each_process_builds_the_network_once(images):
    """Loading a pickle builds nothing; all copies in one process share one network."""
    import pickle

    from skdeep._base import NETWORK_BUILDS

    data = pickle.dumps(small_extractor())
    before = sum(NETWORK_BUILDS.values())
    first, second = pickle.loads(data), pickle.loads(data)
    assert sum(NETWORK_BUILDS.values()) == before
    np.testing.assert_array_equal(first.transform(images), second.transform(images))
    assert sum(NETWORK_BUILDS.values()) == before + 1
    assert first.model_ is second.model_


def worker_builds(client, extractor) -> dict:
    """Return how often each worker built the network of ``extractor``."""

    def builds(token=extractor._fit_token):
        from skdeep._base import NETWORK_BUILDS

        return sum(n for key, n in NETWORK_BUILDS.items() if key[0] == token)

    return client.run(builds)


def test_extract_on_a_cluster_builds_once_per_worker(client, photos, tmp_path):
    """Ten tasks on two workers: each worker builds the network at most once."""
    extractor = small_extractor()
    out = tmp_path / "features.zarr"
    labels = [f"class {i % 3}" for i in range(len(photos))]
    skdeep_dask.extract(
        extractor, photos, out, labels=labels, client=client, partition_size=4, verbose=False
    )
    builds = worker_builds(client, extractor)
    assert set(builds.values()) <= {0, 1} and sum(builds.values()) >= 1
    stored = load_features(out)
    assert isinstance(stored["features"], da.Array)
    np.testing.assert_array_equal(np.asarray(stored["features"]), extractor.transform(photos))
    assert stored["paths"].tolist() == photos
    assert stored["labels"].tolist() == labels
    assert stored["feature_names"].tolist() == extractor.get_feature_names_out().tolist()
    assert stored["params"]["backbone"] == "resnet18"


def test_a_killed_worker_changes_nothing_in_the_result(photos, tmp_path):
    """Kill one of two workers mid-run: the result is complete and unchanged.

    Dask reruns the dead worker's tasks; the store equals a single-process run.
    """
    extractor = FeatureExtractor(SlowNet(), image_size=24, precision="float32", batch_size=2)
    extractor.fit()
    out = tmp_path / "features.zarr"
    with local_cluster() as cluster, distributed.Client(cluster) as connected:
        pids = connected.run(os.getpid)
        errors = []

        def run():
            try:
                skdeep_dask.extract(
                    extractor, photos, out, client=connected, partition_size=2, verbose=False
                )
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        store_files = out / "features" / "c"
        while time.monotonic() < deadline and len(list(store_files.glob("*/0"))) < 3:
            time.sleep(0.05)
        done_before_kill = len(list(store_files.glob("*/0")))
        assert 3 <= done_before_kill < 20, "the run must be cut mid-way"
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        thread.join(timeout=180)
        assert not thread.is_alive() and not errors, errors
    stored = np.asarray(load_features(out)["features"])
    np.testing.assert_array_equal(stored, extractor.transform(photos))


def test_an_interrupted_run_resumes_with_only_the_missing_chunks(photos, tmp_path):
    """Resume a run stopped by Ctrl-C: only the missing chunks are computed.

    The store ends with the features of an uninterrupted run.
    """
    out = tmp_path / "features.zarr"
    extractor = FeatureExtractor(InterruptingNet(), image_size=24, precision="float32")
    extractor.set_params(batch_size=4).fit()
    InterruptingNet.batches, InterruptingNet.interrupt_at = 0, 5  # the third chunk's first
    with pytest.raises(KeyboardInterrupt):
        skdeep_dask.extract(extractor, photos, out, n_workers=0, partition_size=8, verbose=False)
    with pytest.raises(ValueError, match="incomplete: 3 of 5 chunks are missing"):
        load_features(out)
    InterruptingNet.interrupt_at, TinyNet.images_seen = 0, 0
    skdeep_dask.extract(extractor, photos, out, n_workers=0, partition_size=8, verbose=False)
    assert TinyNet.images_seen == 24  # three chunks of eight, not all forty images
    TinyNet.images_seen = 0
    np.testing.assert_array_equal(
        np.asarray(load_features(out)["features"]), extractor.transform(photos)
    )


def test_stores_of_other_settings_are_refused_and_replaced_on_request(photos, tmp_path):
    """Refuse a store of other settings; replace it on request.

    Another backbone, layers, images or partition size gives a clear error;
    ``overwrite`` replaces the store.
    """
    out = tmp_path / "features.zarr"
    skdeep_dask.extract(small_extractor(), photos, out, n_workers=0, verbose=False)
    cases = [
        (small_extractor(layers="layer2"), photos, {}, r"with layers=None, not 'layer2'"),
        (small_extractor(image_size=40), photos, {}, r"with image_size=32, not 40"),
        (small_extractor(), photos[:-1], {}, "from other images"),
        (small_extractor(), photos, {"partition_size": 8}, "with partition_size=1024, not 8"),
        (small_extractor(batch_size=8), photos, {}, r"with batch_size=4, not 8"),
        (small_extractor(), photos, {"labels": ["a"] * 40}, "with other labels"),
    ]
    for extractor, images, options, message in cases:
        with pytest.raises(ValueError, match=f"out: '.*features.zarr' was made {message}"):
            skdeep_dask.extract(extractor, images, out, n_workers=0, verbose=False, **options)
    skdeep_dask.extract(
        small_extractor(layers="layer2"), photos, out, n_workers=0, overwrite=True, verbose=False
    )
    assert load_features(out)["features"].shape == (40, 128)
    (tmp_path / "not_a_store.zarr").write_text("something else")
    with pytest.raises(ValueError, match="exists and is not a skdeep feature store"):
        skdeep_dask.extract(small_extractor(), photos, tmp_path / "not_a_store.zarr", n_workers=0)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="out: cannot create the folder"):
        skdeep_dask.extract(small_extractor(), photos, tmp_path / "a_file" / "f.zarr", n_workers=0)


def test_a_store_of_one_npy_file_is_not_taken_for_another(tmp_path):
    """b.npy of the same length as a.npy is other input: never a's features."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "features.zarr"
    skdeep_dask.extract(small_extractor(), str(tmp_path / "a.npy"), out, n_workers=0, verbose=False)
    with pytest.raises(ValueError, match=r"was made from another \.npy file"):
        skdeep_dask.extract(
            small_extractor(), str(tmp_path / "b.npy"), out, n_workers=0, verbose=False
        )


def test_an_image_changed_in_place_is_named(photos, tmp_path):
    """Rewriting one file of a finished store: resuming is refused and names the file."""
    out = tmp_path / "features.zarr"
    skdeep_dask.extract(small_extractor(), photos, out, n_workers=0, verbose=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos[7])
    with pytest.raises(
        ValueError,
        match=rf"from other images \('.*{os.path.basename(photos[7])}', "
        r"image 7, is changed since\)",
    ):
        skdeep_dask.extract(small_extractor(), photos, out, n_workers=0, verbose=False)


def test_workers_check_that_they_compute_the_stores_features(photos, tmp_path):
    """A worker that would compute at another precision refuses to write its chunk."""
    import torch

    out = tmp_path / "features.zarr"
    extractor = small_extractor()
    store = open_store(
        out, extractor=extractor, n_images=len(photos), paths=photos, partition_size=8
    )
    worker = pickle.loads(pickle.dumps(extractor))
    worker.precision_ = torch.bfloat16  # as a worker that fell back to another precision
    with pytest.raises(
        ValueError,
        match=r"would compute other features .*precision='float32', "
        r"not 'bfloat16'",
    ):
        skdeep_dask._compute_partition(worker, store, 0, skdeep_dask._Partition(tuple(photos[:8])))
    assert store.missing_chunks() == list(range(5))


def test_cli_writes_a_store_on_a_local_cluster_and_on_a_scheduler(client, photos, tmp_path, capsys):
    """Write a store from the command line on a local cluster and on a scheduler.

    The progress bar counts the images of every worker; a rerun of a finished store
    computes nothing.
    """
    folder = os.path.dirname(photos[0])
    network = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]
    network += ["--random-state", "0"]
    out = str(tmp_path / "local.zarr")
    assert main(["extract", folder, *network, "--out", out, "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "skdeep extract: 100%" in err and "40/40" in err
    address = client.scheduler.address
    remote = str(tmp_path / "remote.zarr")
    command = ["extract", folder, *network, "--out", remote, "--partition-size", "8"]
    assert main([*command, "--scheduler", address, "--quiet"]) == 0
    local, other = load_features(out), load_features(remote)
    np.testing.assert_array_equal(np.asarray(local["features"]), np.asarray(other["features"]))
    assert main([*command, "--scheduler", address]) == 0  # already complete
    assert f"40/40 already in {remote}" in capsys.readouterr().err


def test_cli_store_errors(photos, tmp_path, capsys):
    """Options of the store on a joblib output, and a store of other settings, are named."""
    folder = os.path.dirname(photos[0])
    network = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--quiet"]
    network += ["--random-state", "0"]
    assert main(["extract", folder, *network, "--out", "f.joblib", "--workers", "2"]) == 2
    assert "--workers and --scheduler write a feature store" in capsys.readouterr().err
    out = str(tmp_path / "f.zarr")
    assert main(["extract", folder, *network, "--out", out]) == 0
    assert main(["extract", folder, *network, "--layers", "layer1", "--out", out]) == 2
    assert "was made with layers=None, not ['layer1']" in capsys.readouterr().err
    assert (
        main(["extract", folder, *network, "--layers", "layer1", "--out", out, "--overwrite"]) == 0
    )
    assert load_features(out)["features"].shape == (40, 64)
    unseeded = [arg for arg in network if arg not in ("--random-state", "0")]
    assert main(["extract", folder, *unseeded, "--layers", "layer1", "--out", out]) == 2
    assert "with other network weights" in capsys.readouterr().err
