"""``lrpkit.catalog``: preprocessing that follows timm's data config and equals timm's eval transform, models by
name with local weights (the classifier size read from the file), clear errors, and methods by name."""

import numpy as np
import pytest
import torch
from PIL import Image

from lrpkit import catalog, data
from lrpkit.models import WEIGHTS_DIR as WEIGHTS


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 120 x 200 (H x W) RGB noise image: non-square, so that resizing and cropping both matter."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((rng.random((120, 200, 3)) * 255).astype("uint8")).save(path)
    return path


def test_from_timm_follows_the_data_config():
    import timm

    # test_vit's pretrained config: input (3, 160, 160), crop_pct 0.95, bicubic, mean = std = 0.5
    prep = catalog.Preprocess.from_timm(timm.create_model("test_vit"))
    assert prep.size == (160, 160)
    assert prep.resize == 168  # floor(160 / 0.95) = floor(168.42)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)
    assert prep.interpolation == "bicubic" and prep.crop_mode == "center"
    # a non-square input and another crop mode: floor(48 / 0.9) = 53, floor(64 / 0.9) = 71
    model = timm.create_model("test_vit", pretrained_cfg_overlay=dict(
        input_size=(3, 48, 64), crop_pct=0.9, crop_mode="squash", mean=(0.1, 0.2, 0.3), interpolation="bilinear"))
    prep = catalog.Preprocess.from_timm(model)
    assert (prep.size, prep.resize, prep.crop_mode, prep.mean) == ((48, 64), (53, 71), "squash", (0.1, 0.2, 0.3))
    assert prep.interpolation == "bilinear"


def test_load_equals_timms_eval_transform(photo):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("test_vit")
    prep = catalog.Preprocess.from_timm(model)
    with Image.open(photo) as image:
        expected = create_transform(**resolve_data_config({}, model=model))(image.convert("RGB"))
    x = prep.normalize(prep.load(photo))
    assert x.shape == expected.shape == (3, 160, 160)
    # the same steps (Pillow resize of the 8-bit image, uint8 / 255, then (x - mean) / std): equal up to float
    # rounding of the normalisation, not merely to 1e-2
    assert torch.allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("size", [(48, 64), (64, 48)])
def test_every_crop_mode_equals_timm(photo, crop_mode, size):
    from timm.data.transforms_factory import transforms_imagenet_eval

    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    timm_transform = transforms_imagenet_eval(img_size=size, crop_pct=0.9, crop_mode=crop_mode,
                                              interpolation="bilinear", mean=mean, std=std)
    prep = catalog.Preprocess(size=size, resize=tuple(int(s / 0.9) for s in size), mean=mean, std=std,
                              interpolation="bilinear", crop_mode=crop_mode)
    with Image.open(photo) as image:
        expected = timm_transform(image.convert("RGB"))
    assert torch.allclose(prep.normalize(prep.load(photo)), expected, atol=1e-6)


def test_load_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    # a 2 x 4 image whose column j has the grey value 10·j: resize "shorter side to 2" is the identity, the
    # center crop to 2 x 2 starts at column round((4 - 2) / 2) = 1, so it keeps the values 10 and 20
    pixels = np.tile((np.arange(4) * 10).astype("uint8")[None, :, None], (2, 1, 3))
    path = tmp_path / "ramp.png"
    Image.fromarray(pixels).save(path)
    prep = catalog.Preprocess(size=(2, 2), resize=2, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    x01 = prep.load(path)
    assert torch.equal(x01, torch.tensor([10.0, 20.0]).div(255).expand(3, 2, 2))
    # normalize: (10/255 - 0.5) / 0.25 = -1.84314
    assert prep.normalize(x01)[0, 0, 0].item() == pytest.approx((10 / 255 - 0.5) / 0.25)


def test_load_errors(tmp_path):
    prep = catalog.Preprocess(size=(2, 2), resize=2, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(FileNotFoundError, match="image not found"):
        prep.load(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        prep.load(tmp_path)
    (tmp_path / "x.png").write_text("text")
    with pytest.raises(ValueError, match="cannot read .*x.png as an image"):
        prep.load(tmp_path / "x.png")
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        catalog.Preprocess(size=(2, 2), resize=2, mean=(0.5,) * 3, std=(0.25,) * 3, crop_mode="middle")
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        catalog.Preprocess(size=(2, 2), resize=2, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="cubic")


def test_demo_models_and_their_preprocessing():
    model, prep = catalog.load_model("demo_vit")
    assert not model.training
    assert (prep.size, prep.resize, prep.mean, prep.std) == ((64, 64), 64, data.MEAN, data.STD)
    x01 = data.make_dataset(1, seed=3)[0]
    assert torch.equal(prep.normalize(x01), data.normalize(x01))
    assert catalog.class_names("demo_vit", model) == list(data.CLASS_NAMES)


def save(model, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_with_another_head_size(tmp_path, suffix):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=7).eval()
    model, prep = catalog.load_model("test_vit", save(source, tmp_path / f"w{suffix}"))
    assert model.num_classes == 7  # read from the file's head.weight (7, 64)
    x = torch.randn(2, 3, *prep.size)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_head_size_comes_from_the_classifier_key(tmp_path):
    import timm

    # ConvNeXt's state dict (safetensors sorts the names) has 2-d "...mlp.fc2.weight" tensors after
    # "head.fc.weight": the classifier is found through timm's get_classifier(), not by name patterns
    torch.manual_seed(0)
    source = timm.create_model("test_convnext", num_classes=5).eval()
    model, _ = catalog.load_model("test_convnext", save(source, tmp_path / "w.safetensors"))
    assert model.num_classes == 5
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_torchvision_head_size_from_the_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=3).eval()
    model, prep = catalog.load_model("resnet18", save(source, tmp_path / "w.safetensors"))
    assert model.fc.out_features == 3
    assert (prep.size, prep.resize, prep.interpolation) == ((224, 224), 256, "bilinear")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert catalog.class_names("resnet18", model) is None  # 3 classes: unknown names
    assert catalog.class_names("resnet18", torchvision.models.resnet18())[0] == "tench, Tinca tinca"  # ImageNet


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model name 'resnet5'.*did you mean .*resnet50"):
        catalog.load_model("resnet5")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        catalog.load_model("demo_vit", tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file is a folder"):
        catalog.load_model("demo_vit", tmp_path)
    with pytest.raises(ValueError, match=r"demo_cnn has 6 classes \(disc, .*num_classes=10"):
        catalog.load_model("demo_cnn", num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        catalog.load_model("test_vit", num_classes=0)
    with pytest.raises(ValueError, match=r"do not fit Sequential: missing keys \['0.bias', '0.weight'"):
        catalog.load_model("demo_cnn", WEIGHTS / "demo_vit.safetensors")
    torch.save({"head.weight": torch.zeros(2, 2), "opts": __import__("argparse").Namespace(a=1)}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="not a plain state dict; lrpkit never unpickles arbitrary objects"):
        catalog.load_model("demo_cnn", tmp_path / "o.pt")


def test_make_method_errors():
    model, prep = catalog.load_model("demo_cnn")
    with pytest.raises(ValueError, match=r"unknown method 'smoothgard' \(did you mean smoothgrad"):
        catalog.make_method("smoothgard", model, prep)
    with pytest.raises(ValueError, match="method 'raw-attention' does not apply to Sequential"):
        catalog.make_method("raw-attention", model, prep)
    expl = catalog.make_method("epsilon-gamma-box", model, prep)(prep.normalize(torch.rand(1, 3, 64, 64)), 2)
    assert expl.heatmap.shape == (1, 64, 64) and expl.target.tolist() == [2]


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_resize_crop_moves_a_mask_with_its_image(crop_mode):
    # a black 120 x 200 image with a white block at rows 30:90, columns 100:160, and the block's mask (a tensor).
    # After resize_crop (the image with the model's interpolation, the mask with nearest and fill 0) the mask
    # covers the white pixels: intersection over union > 0.9. (A mask squashed while the image keeps its aspect
    # ratio would cover columns 32:53 instead of 32:59 at this size: IoU about 0.78.)
    image = np.zeros((120, 200, 3), dtype="uint8")
    image[30:90, 100:160] = 255
    mask = torch.zeros(1, 120, 200, dtype=torch.uint8)
    mask[:, 30:90, 100:160] = 1
    prep = catalog.Preprocess(size=(48, 64), resize=(53, 71), mean=(0.5,) * 3, std=(0.5,) * 3,
                              interpolation="bilinear", crop_mode=crop_mode)
    white = prep.transform(Image.fromarray(image))[0] > 0.75  # not the grey border padding (0.5)
    m = prep.resize_crop(mask, interpolation="nearest", fill=0)[0].bool()
    assert m.shape == white.shape == (48, 64)
    assert (m & white).sum() / (m | white).sum() > 0.9
