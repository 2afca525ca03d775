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
from skdeep._layouts import Layout, measure_layout, parse_layout, reconcile


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
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with torch.inference_mode():
        extractor.model_(batch)
    handle.remove()
    return seen[0].float().cpu()


def extract(backbone, layer, pooling, images, **params):
    """Fit a random-weight extractor on one layer; return it and its features."""
    # On the CPU: layouts do not depend on the device, and the references run there.
    defaults = dict(weights=None, image_size=32, random_state=0, precision="float32", device="cpu")
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


class Tokenizer(nn.Module):
    """Patch tokens of no known family: (N, T, C) after ``mix``, (N, C, T) after ``flat``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.flat = nn.Flatten(2)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        """Embed, flatten, mix, and classify the mean token."""
        tokens = self.mix(self.flat(self.embed(x)).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_layouts_of_unknown_families_are_measured(photos):
    """No rule knows ``mix``: the probe sees tokens, whose count follows the image width."""
    extractor, features = extract(Tokenizer(), "mix", "avg", photos, weights="DEFAULT")
    assert extractor.layouts_ == {"mix": "tokens:0"}
    raw = raw_output(extractor, "mix", photos)
    np.testing.assert_allclose(features, raw.mean(1).numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_layouts_are_an_error_that_says_how_to_declare_them(photos):
    """A layout neither a rule nor the probe can place: name the layer and ``layouts``."""
    with pytest.raises(ValueError, match=r"cannot tell the layout of 'flat' .*layouts=\{'flat'"):
        FeatureExtractor(Tokenizer(), layers="flat", image_size=32).fit()
    with pytest.raises(ValueError, match=r"layouts: 'sideways' for layer 'mix' is not a layout"):
        FeatureExtractor(Tokenizer(), layers="mix", layouts={"mix": "sideways"}).fit()
    with pytest.raises(ValueError, match="'mix' has no class token"):
        FeatureExtractor(Tokenizer(), layers="mix", layouts={"mix": "tokens"}, pooling="cls").fit()


def test_declared_layouts_that_the_probe_contradicts_are_refused(photos):
    """A declaration the probe can check is checked: no silent wrong pooling."""
    with pytest.raises(ValueError, match=r"layouts: 'tokens:1:cls' does not fit 'mix'.*counts 0"):
        extract(Tokenizer(), "mix", "cls", photos, layouts={"mix": "tokens:1:cls"})
    with pytest.raises(ValueError, match=r"layouts: 'channels_last' does not fit 'layer2'"):
        extract("resnet18", "layer2", "avg", photos, layouts={"layer2": "channels_last"})


def test_channels_last_maps_of_timm_declarations_are_verified(photos):
    """MambaOut declares NHWC features under the name ``stages``: 2 columns were wrong."""
    pytest.importorskip("timm")
    extractor, features = extract(
        "timm:mambaout_femto", "intermediate:-1", "avg", photos, image_size=64
    )
    assert extractor.layouts_ == {"stages.3": "channels_last"}
    raw = raw_output(extractor, "stages.3", photos)
    assert features.shape == (4, raw.shape[-1]) != (4, 2)
    np.testing.assert_allclose(features, raw.mean((1, 2)).numpy(), rtol=1e-4, atol=1e-5)


def test_measurements_from_the_two_probes():
    """The axes that follow the image width are spatial; leading tokens do not multiply."""
    maps, wide_maps = torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 8)
    assert measure_layout(maps, wide_maps, 64).layout == Layout("channels_first")
    last = measure_layout(maps.permute(0, 2, 3, 1), wide_maps.permute(0, 2, 3, 1), 64)
    assert last.layout == Layout("channels_last")
    tokens, wide_tokens = torch.zeros(2, 1 + 16, 8), torch.zeros(2, 1 + 32, 8)
    assert measure_layout(tokens, wide_tokens, 64).layout == Layout("tokens", 1)
    assert measure_layout(tokens, None, 64, channels=8, patch=16).layout == Layout("tokens", 1)
    # Refused width probe: the declared channel count places the axes, or nothing does.
    assert measure_layout(maps, None, 64, channels=8).layout == Layout("channels_first")
    assert measure_layout(torch.zeros(2, 4, 4, 4), None, 64, channels=4).layout is None
    assert measure_layout(torch.zeros(2, 512, 1, 1), None, 64).layout == Layout("channels_first")
    windows = measure_layout(torch.zeros(8, 7, 7, 96), torch.zeros(16, 7, 7, 96), 64)
    assert windows.layout is None and "not hold one entry per image" in windows.evidence
    assert measure_layout(torch.zeros(2, 8, 16), torch.zeros(2, 8, 32), 64).layout is None


def test_rules_and_probes_must_agree():
    """A rule that the probe contradicts is an error, never a silent choice of one."""
    first = measure_layout(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 8), 64)
    with pytest.raises(
        ValueError,
        match=r"'x' .* is uncertain: its model family says "
        r"channels_last, but a probe shows channels_first",
    ):
        reconcile("x", (2, 8, 4, 4), Layout("channels_last"), first)
    counted = measure_layout(torch.zeros(2, 17, 8), torch.zeros(2, 33, 8), 64)
    assert reconcile("x", (2, 17, 8), Layout("tokens", None, True), counted) == Layout(
        "tokens", 1, True
    )
    with pytest.raises(ValueError, match="a probe counts 1 leading tokens"):
        reconcile("x", (2, 17, 8), Layout("tokens", 5, True), counted)


def test_window_attention_internals_are_refused(photos):
    """Windows of a Swin stage are not images: name the layer, ask for a declaration."""
    pytest.importorskip("timm")
    layer = "layers.0.blocks.0.attn"  # timm's WindowAttention: (windows x images, T, C)
    with pytest.raises(ValueError, match=rf"cannot tell the layout of '{layer}'.* entries for 2"):
        extract("timm:swin_tiny_patch4_window7_224", layer, "avg", photos[:2], image_size=224)


def test_maxxvit_partitions_are_refused_and_its_blocks_placed(photos):
    """MaxViT's partitioned attention holds windows; the blocks around it hold NHWC maps."""
    pytest.importorskip("timm")
    skip_unless_this_timm_has("test_maxvit")
    block = "stages.1.blocks.0"
    with pytest.raises(ValueError, match=r"cannot tell .*attn_block.attn.* has 32 entries for 2"):
        extract("timm:test_maxvit", f"{block}.attn_block.attn", "avg", photos[:2], image_size=64)
    extractor, features = extract(
        "timm:test_maxvit", f"{block}.attn_block.mlp", "avg", photos[:2], image_size=64
    )
    assert extractor.layouts_ == {f"{block}.attn_block.mlp": "channels_last"}
    raw = raw_output(extractor, f"{block}.attn_block.mlp", photos[:2])
    np.testing.assert_allclose(features, raw.mean((1, 2)).numpy(), rtol=1e-4, atol=1e-5)


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


# ----------------------------------------------------------------------------------------
# Every family: pooled by skdeep = the model's own output pooled by hand, or a clear error
# ----------------------------------------------------------------------------------------

# The smallest model (by parameter count) of every timm module that defines
# forward_intermediates, up to 30 M parameters, in timm 1.0; the larger ones (BEiT,
# SAM, VGG, NASNet, ... base models) take too long to build for a test. Image sizes
# other than 64 are those the network needs. Some of them hooks cannot read (the module
# feature_info names is missing, returns a tuple or list, or never runs: CoaT, CrossViT,
# EfficientViM, HRNet, MViTv2, PiT, TNT, Twins): skdeep reads those through timm's own
# forward_intermediates.
TIMM_FAMILIES = {
    "test_byobnet": 64, "cait_xxs24_224": 64, "coat_tiny": 64, "convit_tiny": 64,
    "convmixer_768_32": 64, "test_convnext": 64, "cpubone_nano": 64, "crossvit_tiny_240": 240,
    "csatv2": 64, "cs3darknet_focus_s": 64, "cspnext_tiny": 64, "davit_tiny": 64,
    "deit_tiny_patch16_224": 64, "deit_tiny_distilled_patch16_224": 64, "densenet121": 64,
    "dla46x_c": 64, "dpn48b": 64, "edgenext_xx_small": 64, "efficientformer_l1": 224,
    "efficientformerv2_s0": 64, "test_efficientnet": 64, "efficientvim_m1": 64,
    "efficientvit_b0": 64, "efficientvit_m0": 64, "vit_tiny_patch16_dinov3_qkvb": 64,
    "fasternet_t0": 64, "fastvit_t8": 64, "focalnet_tiny_srf": 64, "gcvit_xxtiny": 64,
    "ghostnet_050": 64, "hgnetv2_b0": 64, "hiera_tiny_224": 64, "hrnet_w18_small": 64,
    "sam2_hiera_tiny": 64, "iformer_t": 64, "inception_next_atto": 64, "inception_v3": 96,
    "lcnetv2_small": 64, "levit_128s": 64, "lowformer_b0": 64, "test_mambaout": 64,
    "test_coatnet": 64, "mvitv2_tiny": 64, "poolformerv2_s12": 64, "gmlp_ti16_224": 64,
    "mobilenetv3_small_050": 64, "nest_tiny": 64, "test_nfnet": 64, "pit_ti_224": 64,
    "pvt_v2_b0": 64, "rdnet_tiny": 64, "regnetx_002": 64, "repghostnet_050": 64,
    "repvit_m1": 64, "test_resnet": 64, "resnetv2_18": 64, "rexnet_100": 64,
    "legacy_seresnet18": 64, "sequencer2d_s": 64, "shvit_s1": 64, "starnet_s050": 64,
    "swiftformer_xs": 64, "swin_tiny_patch4_window7_224": 64,
    "swinv2_tiny_window16_256": 64, "swinv2_cr_tiny_224": 64, "tiny_vit_5m_224": 64,
    "tnt_s_legacy_patch16_224": 64, "twins_svt_small": 64, "visformer_tiny": 64,
    "test_vit": 64, "test_vit_relpos": 64, "volo_d1_224": 64, "ese_vovnet19b_slim_dw": 64,
    "legacy_xception": 64, "xception41p": 64, "xcit_nano_12_p8_224": 64,
}  # fmt: skip
# Families skdeep refuses, and the reason its error gives: none in this timm release.
TIMM_REFUSED: dict[str, str] = {}
# Families whose last intermediate a hook on its module cannot read.
READ_BY_TIMM = {
    "coat_tiny", "crossvit_tiny_240", "efficientvim_m1", "hrnet_w18_small", "mvitv2_tiny",
    "pit_ti_224", "tnt_s_legacy_patch16_224", "twins_svt_small",
}  # fmt: skip


def two_images(size: int) -> np.ndarray:
    """Two random RGB images of ``size`` x ``size`` pixels."""
    return np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def test_the_timm_family_sweep_covers_enough_families():
    """At least 30 timm families are swept, each once, and refusals are the exception."""
    assert len(TIMM_FAMILIES) + len(TIMM_REFUSED) >= 30
    assert not set(TIMM_FAMILIES) & set(TIMM_REFUSED)
    assert len(TIMM_REFUSED) <= len(TIMM_FAMILIES) // 10
    assert READ_BY_TIMM <= set(TIMM_FAMILIES)


def skip_unless_this_timm_has(name: str) -> None:
    """Skip where the installed timm lacks ``name`` or its ``forward_intermediates``.

    The sweep pins the behaviour of the timm release that ``make test`` installs; older
    releases gave fewer families ``forward_intermediates`` and other internals.
    """
    if name not in timm.list_models() or not hasattr(_skeleton(name), "forward_intermediates"):
        pytest.skip(f"timm {timm.__version__} has no forward_intermediates for {name}")


def _skeleton(name: str) -> torch.nn.Module:
    """Build timm's ``name`` without memory for its weights (on the meta device) when it can.

    Only its class matters here, and initialising the weights of the larger families
    took seconds each.
    """
    try:
        with torch.device("meta"):
            return timm.create_model(name)
    except Exception:  # a model that computes with tensors while it is built
        return timm.create_model(name)


@pytest.mark.parametrize("name, size", sorted(TIMM_FAMILIES.items()))
def test_timm_intermediates_and_pre_logits_are_timms_own(name, size):
    """``intermediate:-1`` and ``penultimate`` are what timm itself computes.

    The last intermediate averaged by skdeep equals ``forward_intermediates``' output
    averaged (read by a hook where one can, by timm otherwise), and the penultimate
    rows are timm's pre-logits, ``forward_head(forward_features(x), pre_logits=True)``.
    """
    skip_unless_this_timm_has(name)
    images = two_images(size)
    extractor, features = extract(
        f"timm:{name}", ["intermediate:-1", "penultimate"], "avg", images, image_size=size
    )
    assert extractor.layers_[0].startswith("intermediate:") == (name in READ_BY_TIMM)
    model, batch = extractor.model_, model_input(extractor, images)
    with torch.inference_mode():
        (own,) = model.forward_intermediates(batch, indices=[-1], intermediates_only=True)
        pre_logits = model.forward_head(model.forward_features(batch), pre_logits=True)
    assert own.ndim == 4  # (N, C, H, W), as timm returns intermediates by default
    width = own.shape[1]
    np.testing.assert_allclose(features[:, :width], own.mean((2, 3)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features[:, width:], pre_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, message", sorted(TIMM_REFUSED.items()))
def test_timm_families_skdeep_cannot_read_are_clear_errors(name, message):
    """Where skdeep cannot read the last intermediate, fit says so and names it."""
    skip_unless_this_timm_has(name)
    with pytest.raises((ValueError, TypeError), match=message):
        extract(f"timm:{name}", "intermediate:-1", "avg", two_images(64), image_size=64)


def test_a_distilled_models_penultimate_is_both_tokens_for_both_estimators(photos):
    """DeiT distilled: pre-logits average the class and distillation tokens, one head rule.

    The last Linear, ``head_dist``, sees the distillation token alone; FeatureExtractor
    took its input, while FineTuneClassifier named ``head`` its head and trained
    ``head_dist`` at the backbone's rate (frozen with ``freeze="backbone"``).
    """
    from skdeep import FineTuneClassifier

    name = "timm:deit_tiny_distilled_patch16_224"
    extractor, features = extract(name, "penultimate", "avg", photos)
    model, batch = extractor.model_, model_input(extractor, photos)
    with torch.inference_mode():
        tokens = model.forward_features(batch)
    np.testing.assert_allclose(features, (tokens[:, 0] + tokens[:, 1]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features, tokens[:, 1], atol=1e-3)
    clf = FineTuneClassifier(
        name, weights=None, image_size=32, max_epochs=1, batch_size=4, freeze="backbone",
        lr=0.1, random_state=0,
    )  # fmt: skip
    torch.manual_seed(0)
    clf.fit(photos, np.array(["a", "b"] * 2))
    assert clf.head_name_ == "head"
    assert all(p.requires_grad for p in clf.model_.head_dist.parameters())
    assert clf.frozen_modules_ and "head_dist" not in clf.frozen_modules_
    batch = model_input(clf, photos)
    with torch.inference_mode():
        tokens = clf.model_.eval().forward_features(batch)
    np.testing.assert_allclose(
        clf.transform(photos), (tokens[:, 0] + tokens[:, 1]) / 2, rtol=1e-4, atol=1e-5
    )
    assert clf.get_feature_names_out().shape == (192,)


def _cls_free_mean(tokens):
    return tokens[:, 1:].mean(1)


# One model of every torchvision classification family: its last stage, the true layout
# (from torchvision's code), and the input size it needs.
TORCHVISION_FAMILIES = {
    "alexnet": ("features", lambda t: t.mean((2, 3)), 64),
    "convnext_tiny": ("features", lambda t: t.mean((2, 3)), 64),
    "densenet121": ("features", lambda t: t.mean((2, 3)), 64),
    "efficientnet_b0": ("features", lambda t: t.mean((2, 3)), 64),
    "efficientnet_v2_s": ("features", lambda t: t.mean((2, 3)), 64),
    "googlenet": ("inception5b", lambda t: t.mean((2, 3)), 64),
    "inception_v3": ("Mixed_7c", lambda t: t.mean((2, 3)), 96),
    "maxvit_t": ("blocks.3", lambda t: t.mean((2, 3)), 224),
    "mnasnet0_5": ("layers", lambda t: t.mean((2, 3)), 64),
    "mobilenet_v2": ("features", lambda t: t.mean((2, 3)), 64),
    "mobilenet_v3_small": ("features", lambda t: t.mean((2, 3)), 64),
    "regnet_x_400mf": ("trunk_output", lambda t: t.mean((2, 3)), 64),
    "resnet18": ("layer4", lambda t: t.mean((2, 3)), 64),
    "shufflenet_v2_x0_5": ("conv5", lambda t: t.mean((2, 3)), 64),
    "squeezenet1_1": ("features", lambda t: t.mean((2, 3)), 64),
    "swin_t": ("norm", lambda t: t.mean((1, 2)), 64),
    "swin_v2_t": ("norm", lambda t: t.mean((1, 2)), 64),
    "vgg11": ("features", lambda t: t.mean((2, 3)), 64),
    "vit_b_16": ("encoder", _cls_free_mean, 224),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_FAMILIES))
def test_torchvision_last_stages_pool_like_their_true_layout(name):
    """The last stage averaged by skdeep equals the raw output averaged over its true axes."""
    layer, by_hand, size = TORCHVISION_FAMILIES[name]
    images = two_images(size)
    extractor, features = extract(name, layer, "avg", images, image_size=size)
    raw = raw_output(extractor, layer, images)
    np.testing.assert_allclose(features, by_hand(raw).numpy(), rtol=1e-4, atol=1e-4)
