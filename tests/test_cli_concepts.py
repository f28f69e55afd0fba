"""``lrpkit concepts`` end to end on the bundled CNN (with reference samples) and ViT, and every user error (exit
status 2, one line on stderr naming the problem and the fix, nothing written).

The concepts, their relevance and their share are checked against the relevance at the layer computed here
independently: the layerwise LRP relevance of the top-level layer (CNN), the Tape's ``relevance_at`` of the step
after the layer (ViT); the reference samples against :func:`lrpkit.crp.reference_samples`. The end-to-end tests
run the CRP analyzer (``lrpkit.crp.CRP``); the error tests stop before it.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import lrpkit
from lrpkit import cli
from lrpkit.app import zoo
from lrpkit.crp import reference_samples
from lrpkit.crp.locate import locate
from lrpkit.data import make_dataset


def save_image(x01: torch.Tensor, path: Path) -> Path:
    Image.fromarray((x01.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two images to explain and a reference folder of six (DIR/images/)."""
    root = tmp_path_factory.mktemp("concepts")
    x01, _, _ = make_dataset(8, seed=21)
    (root / "ref" / "images").mkdir(parents=True)
    images = [save_image(x01[i], root / f"img{i}.png") for i in range(2)]
    refs = [save_image(x01[i], root / "ref" / "images" / f"r{i}.png") for i in range(2, 8)]
    return root, images, refs


def call(argv, capsys):
    code = cli.main(["concepts", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def inputs(model_name, paths):
    model, prep = zoo.load_model(model_name)
    return model, prep, prep.normalize(torch.stack([prep.load(p) for p in paths]))


def test_cnn_concepts_with_reference_samples(folders, tmp_path, capsys):
    root, images, refs = folders
    out = tmp_path / "out"
    code, stdout, err = call([*images, "--model", "demo_cnn", "--layer", "12", "--top", "3",
                              "--reference-data", root / "ref", "--reference-k", "2", "--out", out], capsys)
    assert code == 0, err
    summary = json.loads((out / "concepts.json").read_text())
    model, prep, x = inputs("demo_cnn", images)
    lrp = lrpkit.LRP(model)
    expl = lrp(x, layerwise=True)
    ref = locate(lrp, "12")  # the last convolution (BatchNorm fused): its output enters the ReLU
    per_channel = expl.layerwise[ref.index + 1].sum((2, 3))  # R_c = Σ_p R_{c,p}, (B, 64)
    scan = reference_samples(lrp, torch.stack([prep.normalize(prep.load(p)) for p in refs]), "12", k=2,
                             progress=False)
    for b, row in enumerate(summary["images"]):
        assert row["target"] == int(expl.target[b]) and row["png"] == str(out / f"img{b}.png")
        assert Path(row["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        top = per_channel[b].topk(3)
        assert [c["channel"] for c in row["concepts"]] == top.indices.tolist()
        total = per_channel[b].sum()
        assert row["layer_relevance"] == pytest.approx(float(total), rel=1e-5)
        for c, value in zip(row["concepts"], top.values):
            assert c["relevance"] == pytest.approx(float(value), rel=1e-4, abs=1e-6)
            assert c["share"] == pytest.approx(float(value / total), rel=1e-4, abs=1e-6)
        assert row["references"] == [scan.indices[scan.row(c)].tolist() for c in top.indices.tolist()]
        assert f"img{b}.png: class {row['target']}" in stdout
    assert summary["reference_images"] == [str(p) for p in refs]
    assert (out / "reference-cache" / "state.pt").is_file()
    # a rerun reuses the scan and writes the same summary
    code, _, err = call([*images, "--model", "demo_cnn", "--layer", "12", "--top", "3",
                         "--reference-data", root / "ref", "--reference-k", "2", "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / "concepts.json").read_text()) == summary


def test_vit_concepts_are_channels_of_the_token_stream(folders, tmp_path, capsys):
    _, images, _ = folders
    out = tmp_path / "vit"
    code, stdout, err = call([images[0], "--model", "demo_vit", "--layer", "blocks.2", "--top", "2",
                              "--target", "disc", "--out", out], capsys)
    assert code == 0, err
    row = json.loads((out / "concepts.json").read_text())["images"][0]
    model, _, x = inputs("demo_vit", images[:1])
    lrp = lrpkit.LRP(model)
    ref = locate(lrp, "blocks.2")  # the residual stream after block 2 (its MLP's SkipConnection)
    top_level = [s.index for s in lrp.steps]
    after = top_level[top_level.index(ref.index) + 1]  # block 3's attention SkipConnection: its input relevance
    tape = lrpkit.tape.Tape(lrp.plan, relevance_at=[after])
    with torch.enable_grad():
        output = tape.forward(lrp.steps, x)
    tape.backward(lrp.steps, torch.nn.functional.one_hot(torch.tensor([0]), output.shape[1]).float())
    per_channel = tape.relevances[after].sum(1)  # tokens (B, N, 96): the channel is the last dim
    assert row["target"] == 0 and row["target_name"] == "disc"
    assert [c["channel"] for c in row["concepts"]] == per_channel[0].topk(2).indices.tolist()
    assert row["references"] is None


@pytest.mark.parametrize("extra, message", [
    (["--layer", "13"], "no layer '13' in the canonized model"),  # the BatchNorm after conv 12: fused
    (["--layer", "features.3"], "Layers that can be chosen: 0, 2, 3, 4"),
    (["--layer", "12", "--top", "0"], "--top must be a positive int, got 0"),
    (["--layer", "12", "--top", "65"], "--top 65 is larger than the 64 channels of layer 12"),
    (["--layer", "12", "--reference-data", "nowhere"], "--reference-data folder not found: nowhere"),
    (["--layer", "12", "--reference-data", "REF", "--reference-k", "7"], "--reference-k 7 is larger than the 6 "
                                                                         "images in"),
])
def test_user_errors(folders, tmp_path, capsys, extra, message):
    root, images, _ = folders
    out = tmp_path / "never"
    extra = [str(root / "ref") if a == "REF" else a for a in extra]
    code, stdout, err = call([images[0], "--model", "demo_cnn", "--out", out, *extra], capsys)
    assert code == 2 and err.startswith("lrpkit concepts: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
