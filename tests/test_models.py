"""The weight loader (safe formats, clear errors) and the shipped demo models."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lrpkit.data import CLASS_NAMES, make_dataset, normalize
from lrpkit.models import WEIGHTS_DIR, build_model, load_config, load_demo_cnn, load_demo_vit, load_weights


def _net():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_round_trip_safetensors_and_state_dict(tmp_path):
    torch.manual_seed(0)
    src = _net()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    x = torch.randn(5, 4)
    for name in ("w.safetensors", "w.pt", "ckpt.pt"):
        dst = load_weights(_net(), tmp_path / name)
        assert torch.equal(dst(x), src(x)), name


def test_mismatching_weights_give_clear_errors(tmp_path):
    save_file(_net().state_dict(), str(tmp_path / "w.safetensors"))
    wrong_shape = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"w\.safetensors.*shape mismatches.*0\.weight: file \(3, 4\) vs model \(5, 4\)"):
        load_weights(wrong_shape, tmp_path / "w.safetensors")
    longer = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"missing keys \['3\.bias', '3\.weight'\]"):
        load_weights(longer, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['2\.bias', '2\.weight'\]"):
        load_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.safetensors")
    load_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.safetensors", strict=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_weights(_net(), tmp_path / "nowhere.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save(_net(), tmp_path / "module.pt")  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match=r"module\.pt: not a plain state dict"):
        load_weights(_net(), tmp_path / "module.pt")


def test_configs_and_weight_files_are_small():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert total < 5 * 2 ** 20
    for name in ("demo_vit", "demo_cnn"):
        cfg = load_config(name)
        assert cfg["kwargs"]["num_classes"] == len(CLASS_NAMES)
        assert json.loads((WEIGHTS_DIR / f"{name}.json").read_text()) == cfg


def test_demo_models_reach_95_percent_on_fresh_images():
    images, labels, _ = make_dataset(200, seed=12345)  # a stream used neither in training nor in its evaluation
    vit, cnn = load_demo_vit(), load_demo_cnn()
    assert not vit.training and not cnn.training and isinstance(cnn, nn.Sequential)
    with torch.no_grad():
        for model in (vit, cnn):
            acc = (model(normalize(images)).argmax(1) == labels).float().mean().item()
            assert acc >= 0.95, (type(model).__name__, acc)


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown demo architecture"):
        build_model({"arch": "resnet"})


def test_load_weights_error_lists_at_most_ten_keys(tmp_path):
    # 12 Linear layers in the model, none in the file: 24 missing keys, of which 10 are named, then "(14 more)"
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(ValueError, match=r"missing keys \['0\.bias', .*, \.\.\. \(14 more\)\], unexpected keys "
                                         r"\['other\.weight'\]") as err:
        load_weights(model, tmp_path / "w.safetensors")
    assert str(err.value).count(".weight'") + str(err.value).count(".bias'") == 11
