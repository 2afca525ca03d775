"""Tests of the command line, ``python -m skdeep extract``."""

import joblib
import numpy as np
import pytest

from skdeep.__main__ import find_images, main


def test_extract_a_folder_with_labels_from_sub_folders(image_files, tmp_path, capsys):
    """Extract a folder with labels from sub folders."""
    out = tmp_path / "features.joblib"
    folder = tmp_path / "photos"
    code = main(
        [
            "extract",
            str(folder),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--layers",
            "layer1",
            "layer2",
            "--image-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    dump = joblib.load(out)
    assert dump["features"].shape == (12, 64 + 128)
    assert dump["paths"] == sorted(image_files)
    expected = ["cat" if "/cat/" in path else "dog" for path in dump["paths"]]
    assert dump["labels"].tolist() == expected
    assert dump["feature_names"][0] == "layer1_avg_0"
    assert dump["params"]["layers"] == ["layer1", "layer2"]
    err = capsys.readouterr().err
    assert "100%" in err and "12/12" in err and "wrote 12 x 192 features" in err


SMALL_RANDOM_NETWORK = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]


def test_extract_a_glob_and_a_npy_file(image_files, images, tmp_path):
    """Extract a glob and a npy file."""
    out = str(tmp_path / "glob.joblib")
    pattern = str(tmp_path / "photos" / "cat" / "*.png")
    assert main(["extract", pattern, *SMALL_RANDOM_NETWORK, "--quiet", "--out", out]) == 0
    dump = joblib.load(out)
    assert len(dump["paths"]) == 6 and dump["labels"] is None
    np.save(tmp_path / "images.npy", images)
    out = str(tmp_path / "npy.joblib")
    npy = str(tmp_path / "images.npy")
    assert main(["extract", npy, *SMALL_RANDOM_NETWORK, "--quiet", "--out", out]) == 0
    assert joblib.load(out)["features"].shape == (12, 512)


def test_extract_with_a_timm_transformer_and_token_pooling(image_files, tmp_path):
    """The timm names, intermediates and token poolings reach the extractor."""
    pytest.importorskip("timm")
    out = str(tmp_path / "vit.joblib")
    command = ["extract", str(tmp_path / "photos"), "--backbone", "timm:vit_tiny_patch16_224"]
    options = ["--weights", "none", "--image-size", "32", "--quiet", "--out", out]
    pooled = ["--layers", "intermediate:-1", "--pooling", "cls+mean"]
    assert main([*command, *options, *pooled]) == 0
    dump = joblib.load(out)
    assert dump["features"].shape == (12, 2 * 192)
    assert dump["feature_names"][0] == "blocks.11_cls_0"
    assert dump["feature_names"][-1] == "blocks.11_mean_191"


def test_find_images_labels_by_first_level_folder(tmp_path):
    """Nested files take their first-level folder as label; folders are never images."""
    for relative in ["b/2.PNG", "a/deep/er/1.jpg", "a/0.png", "a/notes.txt", "b/fake.png/3.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).touch()
    paths, labels = find_images(str(tmp_path))
    relative = [path[len(str(tmp_path)) + 1 :] for path in paths]
    assert relative == ["a/0.png", "a/deep/er/1.jpg", "b/2.PNG", "b/fake.png/3.png"]
    assert labels == ["a", "a", "b", "b"]
    (tmp_path / "loose.png").touch()
    assert find_images(str(tmp_path)) == ([*paths, str(tmp_path / "loose.png")], None)


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    """Errors are reported without a traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["extract", str(empty), "--out", str(tmp_path / "x.joblib")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main(["extract", str(empty), "--backbone", "resnet81", "--out", "x"]) == 2


def test_help_documents_the_command(capsys):
    """Help documents the command."""
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in [
        "--backbone",
        "--layers",
        "--out",
        "--pooling",
        "--image-size",
        "first-level sub-folder",
    ]:
        assert option in text


def test_int8_calibrates_on_the_input_images(image_files, tmp_path):
    """--precision int8 gives the features of FeatureExtractor(precision="int8").fit(X)."""
    from skdeep import FeatureExtractor, load_features

    int8 = [*SMALL_RANDOM_NETWORK, "--precision", "int8", "--device", "cpu"]
    int8 += ["--random-state", "0", "--quiet"]
    folder = str(tmp_path / "photos")
    assert main(["extract", folder, *int8, "--out", str(tmp_path / "f.joblib")]) == 0
    dump = joblib.load(tmp_path / "f.joblib")
    extractor = FeatureExtractor(
        "resnet18", weights=None, image_size=32, precision="int8", random_state=0, device="cpu"
    )
    expected = extractor.fit_transform(dump["paths"])
    np.testing.assert_array_equal(dump["features"], expected)
    pytest.importorskip("zarr")
    assert main(["extract", folder, *int8, "--out", str(tmp_path / "f.zarr")]) == 0
    store = load_features(tmp_path / "f.zarr")
    np.testing.assert_array_equal(np.asarray(store["features"]), expected)
