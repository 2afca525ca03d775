"""Tests of output layouts and their pooling, on torchvision and timm families.

Each layout is checked the same way: skdeep's pooled features against the numbers
computed by hand from the tapped module's raw output, for the same network input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from skdeep import FeatureExtractor
from skdeep._images import as_image_source
from skdeep._layouts import Layout, parse_layout


@pytest.fixture
def photos():
    """Four random 32x32 RGB images."""
    return np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def model_input(extractor: FeatureExtractor, images) -> torch.Tensor:
    """Return the preprocessed batch the extractor's network sees for ``images``."""
    return next(extractor._input_batches(as_image_source(images), dtype=torch.float32))


def raw_output(extractor: FeatureExtractor, layer: str, images) -> torch.Tensor:
    """Return what ``layer`` of the fitted extractor's network outputs for ``images``."""
    batch = model_input(extractor, images)
    seen = []
    module = extractor.model_.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        extractor.model_(batch)
    handle.remove()
    return seen[0].float()


def extract(backbone, layer, pooling, images, **params):
    """Fit a random-weight extractor on one layer; return it and its features."""
    defaults = dict(weights=None, image_size=32, random_state=0, precision="float32")
    extractor = FeatureExtractor(backbone, layers=layer, pooling=pooling, **{**defaults, **params})
    return extractor, extractor.fit_transform(images)


def test_swin_stages_are_channels_last_maps(photos):
    """A torchvision Swin stage (N, H, W, C) is averaged over H and W: 384 columns."""
    extractor, features = extract("swin_t", "features.5", "avg", photos, image_size=64)
    assert extractor.layouts_ == {"features.5": "channels_last"}
    raw = raw_output(extractor, "features.5", photos)
    assert features.shape == (4, 384)
    np.testing.assert_allclose(features, raw.mean((1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    assert extractor.get_feature_names_out()[0] == "features.5_avg_0"


def test_convnext_block_internals_between_permutes_are_channels_last(photos):
    """A torchvision ConvNeXt block's LayerNorm sees (N, H, W, C)."""
    extractor, features = extract("convnext_tiny", "features.1.0.block.2", "max", photos)
    assert extractor.layouts_ == {"features.1.0.block.2": "channels_last"}
    raw = raw_output(extractor, "features.1.0.block.2", photos)
    np.testing.assert_allclose(features, raw.amax((1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    stage, _ = extract("convnext_tiny", "features.1", "avg", photos)
    assert stage.layouts_ == {"features.1": "channels_first"}


def test_cnn_maps_are_channels_first(photos):
    """A ResNet stage (N, C, H, W) is pooled over H and W; avgmax concatenates both."""
    extractor, features = extract("resnet18", "layer2", "avgmax", photos)
    raw = raw_output(extractor, "layer2", photos)
    expected = torch.cat([raw.mean((2, 3)), raw.amax((2, 3))], 1).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert extractor.get_feature_names_out()[[0, 128]].tolist() == ["layer2_avg_0", "layer2_max_0"]


@pytest.mark.parametrize(
    "pooling, by_hand, name",
    [
        ("cls", lambda t: t[:, 0], "cls"),
        ("mean", lambda t: t[:, 1:].mean(1), "mean"),
        ("cls+mean", lambda t: torch.cat([t[:, 0], t[:, 1:].mean(1)], 1), "cls"),
        ("max", lambda t: t[:, 1:].amax(1), "max"),
        (None, lambda t: t.flatten(1), None),
    ],
)
def test_vit_tokens_pool_the_class_token_and_the_patch_tokens(photos, pooling, by_hand, name):
    """Pool the tokens of torchvision ViT encoder layers: the class token apart."""
    layer = "encoder.layers.encoder_layer_1"
    extractor, features = extract("vit_b_16", layer, pooling, photos[:2], image_size=None)
    assert extractor.layouts_ == {layer: "tokens:1:cls"}
    raw = raw_output(extractor, layer, photos[:2])
    np.testing.assert_allclose(features, by_hand(raw).numpy(), rtol=1e-4, atol=1e-5)
    first = extractor.get_feature_names_out()[0]
    assert first == (f"{layer}_{name}_0" if name else f"{layer}_0")


def test_rows_are_used_as_they_are(photos):
    """The penultimate features are rows: no pooling applies."""
    extractor, features = extract("resnet18", "penultimate", "max", photos)
    assert extractor.layouts_ == {"penultimate": "rows"} and features.shape == (4, 512)


def test_unknown_layouts_are_an_error_that_says_how_to_declare_them(photos):
    """A 3-D output of an unknown family: name the layer and the layouts parameter."""

    class Tokenizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, stride=8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))
            return self.head(tokens.mean(1))

    with pytest.raises(ValueError, match=r"cannot tell the layout of 'mix' .*layouts=\{'mix'"):
        FeatureExtractor(Tokenizer(), layers="mix", image_size=32).fit()
    declared = FeatureExtractor(Tokenizer(), layers="mix", layouts={"mix": "tokens"}, image_size=32)
    features = declared.fit_transform(photos)
    raw = raw_output(declared, "mix", photos)
    np.testing.assert_allclose(features, raw.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"layouts: 'sideways' for layer 'mix' is not a layout"):
        FeatureExtractor(Tokenizer(), layers="mix", layouts={"mix": "sideways"}).fit()
    with pytest.raises(ValueError, match="'mix' has no class token"):
        FeatureExtractor(Tokenizer(), layers="mix", layouts={"mix": "tokens"}, pooling="cls").fit()


def test_poolings_of_tokens_do_not_apply_to_maps(photos):
    """pooling='cls' on a CNN map names the layer and the poolings that apply."""
    with pytest.raises(ValueError, match=r"pooling='cls' does not apply to 'layer2'.* a map"):
        extract("resnet18", "layer2", "cls", photos)


def test_layout_declarations():
    """Declarations read as layouts and print back the same."""
    assert parse_layout("tokens:5:cls", "x") == Layout("tokens", 5, True)
    assert str(parse_layout("tokens:5:cls", "x")) == "tokens:5:cls"
    assert parse_layout("channels_last", "x") == Layout("channels_last")
    with pytest.raises(ValueError, match="is not a layout"):
        parse_layout("rows:2", "x")


# ----------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def test_timm_convnext_norm_inside_blocks_is_channels_last(photos):
    """A timm ConvNeXt block's norm (conv_mlp off) sees (N, H, W, C)."""
    extractor, features = extract("timm:convnext_tiny", "stages.1.blocks.0.norm", "avg", photos)
    assert extractor.layouts_ == {"stages.1.blocks.0.norm": "channels_last"}
    raw = raw_output(extractor, "stages.1.blocks.0.norm", photos)
    np.testing.assert_allclose(features, raw.mean((1, 2)).numpy(), rtol=1e-5, atol=1e-6)


def test_timm_register_tokens_are_left_out_of_the_patch_mean(photos):
    """DINOv2 with registers: a class token and four register tokens lead the sequence."""
    extractor, features = extract(
        "timm:vit_small_patch14_reg4_dinov2", "blocks.1", "cls+mean", photos, image_size=28
    )
    assert extractor.layouts_ == {"blocks.1": "tokens:5:cls"}
    raw = raw_output(extractor, "blocks.1", photos)
    expected = torch.cat([raw[:, 0], raw[:, 5:].mean(1)], 1).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_timm_vit_without_class_token(photos):
    """A ViT with one register token and no class token: 'cls' is refused, 'mean' works."""
    extractor, features = extract("timm:vit_pwee_patch16_reg1_gap_256", "blocks.0", "mean", photos)
    assert extractor.layouts_ == {"blocks.0": "tokens:1"}
    raw = raw_output(extractor, "blocks.0", photos)
    np.testing.assert_allclose(features, raw[:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="has no class token"):
        extract("timm:vit_pwee_patch16_reg1_gap_256", "blocks.0", "cls", photos)


def test_timm_networks_stop_after_the_deepest_tap(photos):
    """Tapping block 1 of 12 never runs the last block."""
    extractor, _ = extract("timm:vit_tiny_patch16_224", "blocks.1", "cls", photos)
    calls = []
    handle = extractor.model_.blocks[11].register_forward_hook(lambda *args: calls.append(1))
    extractor.transform(photos)
    handle.remove()
    assert not calls


def test_timm_intermediates_are_those_of_forward_intermediates(photos):
    """'intermediate:N' taps what timm's forward_intermediates(indices=[N]) returns."""
    layers = ["intermediate:-1", "intermediate:2"]
    extractor, features = extract("timm:vit_tiny_patch16_224", layers, "cls+mean", photos)
    assert extractor.layers_ == ["blocks.11", "blocks.2"]
    assert extractor.feature_names_out_[0] == "blocks.11_cls_0"
    with torch.inference_mode():
        prefix_and_patches = extractor.model_.forward_intermediates(
            model_input(extractor, photos),
            indices=[2, 11],
            return_prefix_tokens=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
    expected = []
    for patches, prefix in reversed(prefix_and_patches):  # timm's come in forward order
        expected += [prefix[:, 0], patches.mean(1)]
    np.testing.assert_allclose(features, torch.cat(expected, 1), rtol=1e-4, atol=1e-5)


def test_timm_cnn_intermediates_are_its_stages(photos):
    """A ConvNeXt's intermediates are its stages, pooled as channels-first maps."""
    extractor, features = extract("timm:convnext_atto", "intermediate:1", "avgmax", photos)
    assert extractor.layers_ == ["stages.1"] and features.shape == (4, 2 * 80)
    with torch.inference_mode():
        (stage,) = extractor.model_.forward_intermediates(
            model_input(extractor, photos), indices=[1], intermediates_only=True
        )
    expected = torch.cat([stage.mean((2, 3)), stage.amax((2, 3))], 1)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_timm_intermediate_errors_name_the_range(photos):
    """Bad indices, non-timm backbones and double taps are clear errors."""
    with pytest.raises(ValueError, match=r"layers: 'intermediate:4' is out of range.* -4 to 3"):
        extract("timm:convnext_atto", "intermediate:4", "avg", photos)
    with pytest.raises(ValueError, match=r"must end with an integer index.* got 'last'"):
        extract("timm:convnext_atto", "intermediate:last", "avg", photos)
    with pytest.raises(ValueError, match=r"this ResNet lists none; name a module"):
        extract("resnet18", "intermediate:-1", "avg", photos)
    with pytest.raises(ValueError, match=r"name one module twice"):
        extract("timm:convnext_atto", ["stages.3", "intermediate:-1"], "avg", photos)


def test_declared_layouts_must_name_a_tapped_layer(photos):
    """A layouts key that is not tapped is an error, never silently ignored."""
    with pytest.raises(ValueError, match=r"layouts: 'layer3' is not a tapped layer"):
        extract("resnet18", "layer4", "avg", photos, layouts={"layer3": "channels_first"})
    extractor, _ = extract(
        "timm:convnext_atto", "intermediate:-1", "avg", photos,
        layouts={"intermediate:-1": "channels_first"},
    )  # fmt: skip
    assert extractor.layouts_ == {"stages.3": "channels_first"}


def test_timm_preprocessing_comes_from_its_data_configuration():
    """Resize ratio, interpolation, mean and std are timm's for the architecture."""
    extractor = FeatureExtractor("timm:vit_tiny_patch16_224", weights=None).fit()
    prep = extractor.preprocessing_
    assert (prep.resize_size, prep.crop_size, prep.interpolation) == (248, 224, "bicubic")
    assert prep.mean == (0.5, 0.5, 0.5)


def test_timm_names_and_weights_errors(monkeypatch, tmp_path):
    """Unknown names get suggestions; offline pretrained weights one clear error."""
    import huggingface_hub

    from skdeep import WeightsUnavailableError

    with pytest.raises(ValueError, match=r"not a timm model; did you mean 'convnext_tiny'"):
        FeatureExtractor("timm:convnext_tinny", weights=None).fit()
    with pytest.raises(ValueError, match="a timm backbone takes no weights name"):
        FeatureExtractor("timm:resnet10t", weights="IMAGENET1K_V2").fit()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError, match=r"timm:resnet10t\.c3_in1k: they are not"):
        FeatureExtractor("timm:resnet10t.c3_in1k").fit()
    state = timm.create_model("resnet10t").state_dict()
    torch.save(state, tmp_path / "resnet10t.pth")
    loaded = FeatureExtractor("timm:resnet10t", weights=str(tmp_path / "resnet10t.pth")).fit()
    assert loaded.n_features_out_ == 512


def test_timm_backbones_fine_tune_with_timms_own_head(photos):
    """FineTuneClassifier replaces a timm head with reset_classifier and trains."""
    from skdeep import FineTuneClassifier

    y = np.array(["a", "b"] * 2)
    clf = FineTuneClassifier(
        "timm:vit_tiny_patch16_224", weights=None, image_size=32, max_epochs=1, batch_size=2
    ).fit(photos, y)
    assert clf.head_name_ == "head"
    assert clf.model_.head.out_features == 2 and set(clf.predict(photos)) <= {"a", "b"}
    assert clf.transform(photos).shape == (4, 192)


def test_timm_backbones_adapt_domains_at_an_intermediate(photos):
    """DomainAdaptedClassifier takes timm names, and intermediates as adapt_layers."""
    from skdeep import DomainAdaptedClassifier

    params = dict(weights=None, image_size=32, max_epochs=1, batch_size=2, random_state=0)
    y = np.array(["a", "b"] * 2)
    histories = []
    for layer in ["intermediate:-2", "layer3"]:  # the same module of timm's ResNet
        clf = DomainAdaptedClassifier("timm:resnet10t", adapt_layers=layer, **params)
        histories.append(clf.fit(photos, y, X_target=255 - photos).history_)
    assert histories[0][0]["mmd"] == histories[1][0]["mmd"] != 0
    assert clf.predict(photos).shape == (4,)
    with pytest.raises(ValueError, match=r"adapt_layers: 'intermediate:5' is out of range"):
        clf.set_params(adapt_layers="intermediate:5").fit(photos, y, X_target=photos)


def test_grid_search_tunes_timm_and_torchvision_backbones(photos):
    """Backbone names of both kinds are grid-search values like any other."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    X = np.concatenate([photos] * 3)
    y = np.array([0, 1] * 6)
    search = GridSearchCV(
        make_pipeline(
            FeatureExtractor(weights=None, image_size=32, random_state=0),
            LogisticRegression(max_iter=200),
        ),
        {"featureextractor__backbone": ["resnet18", "timm:resnet10t"]},
        cv=2,
    ).fit(X, y)
    assert len(search.cv_results_["params"]) == 2
