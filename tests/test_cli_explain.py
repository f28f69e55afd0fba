"""``lrpkit explain`` end to end on the bundled ViT and CNN, a timm model with local weights, and every user error
(exit status 2, one line on stderr that names the problem and the fix, nothing written)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrpkit import catalog, cli
from lrpkit.commands import explain
from lrpkit.data import make_dataset
from lrpkit.models import WEIGHTS_DIR as WEIGHTS


def save_image(x01: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] -> an 8-bit RGB PNG."""
    Image.fromarray((x01.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    x01, _, _ = make_dataset(3, seed=11)
    return [save_image(x01[i], folder / f"img{i}.png") for i in range(3)]


def call(argv, capsys):
    """Run ``lrpkit explain argv``; returns (exit status, stdout, stderr)."""
    code = cli.main(["explain", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def api_explanation(method, paths, target=None, model="demo_vit", weights=None):
    """What the Python API gives for the same files: the reference for the command's saved relevance."""
    m, prep = catalog.load_model(model, weights)
    x = prep.normalize(torch.stack([prep.load(p) for p in paths]))
    return catalog.make_method(method, m, prep, 0)(x, target), m(x).detach()


@pytest.fixture(scope="module")
def lrp_run(images, tmp_path_factory):
    """One run: 3 images in batches of 2 and 1, methods lrp and rollout (repeated flag), raw relevance as .npy."""
    out = tmp_path_factory.mktemp("run") / "out"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["explain", *map(str, images), "--model", "demo_vit", "--method", "lrp", "--method", "rollout",
                         "--batch-size", "2", "--save-relevance", "npy", "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_writes_one_png_per_image_and_method(lrp_run, images):
    code, stdout, stderr, out = lrp_run
    assert code == 0, stderr
    for folder in ("input", "lrp", "rollout"):
        for i in range(3):
            with Image.open(out / folder / f"img{i}.png") as png:
                assert png.size == (64, 64)  # the demo models' input size: the overlay is at input resolution
    assert sorted(p.name for p in (out / "lrp").iterdir()) == sorted(
        f"img{i}.{kind}" for i in range(3) for kind in ("png", "heatmap.npy", "relevance.npy"))
    # rollout is token level: no per-pixel input relevance, but the token map (8 x 8 patches of 8 px)
    assert sorted(p.name for p in (out / "rollout").iterdir()) == sorted(
        f"img{i}.{kind}" for i in range(3) for kind in ("png", "heatmap.npy", "tokens.npy"))
    assert np.load(out / "rollout" / "img0.tokens.npy").shape == (8, 8)
    assert "random weights" not in stderr  # the demo model has trained weights


def test_prints_one_line_per_image_and_a_summary(lrp_run, images):
    code, stdout, _, out = lrp_run
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 + 1  # one per image, then where everything went
    rows = read_summary(out)
    assert len(rows) == 3 * 2 and [r["method"] for r in rows[:2]] == ["lrp", "rollout"]
    for i, line in enumerate(lines[:3]):
        row = rows[2 * i]
        assert line.startswith(f"{images[i]}: predicted {row['predicted']} '{row['predicted_name']}' (logit ")
        assert str(out / "lrp" / f"img{i}.png") in line and str(out / "rollout" / f"img{i}.png") in line
        assert row["target"] == row["predicted"]  # no --target: the predicted class
    data = json.loads((out / "summary.json").read_text())
    assert data["methods"] == ["lrp", "rollout"] and data["model"] == "demo_vit" and len(data["rows"]) == 6
    assert data["rows"][0]["raw"] == [str(out / "lrp" / "img0.heatmap.npy"), str(out / "lrp" / "img0.relevance.npy")]


def test_saved_relevance_equals_the_python_api(lrp_run, images):
    _, _, _, out = lrp_run
    rows = read_summary(out)
    lrp, logits = api_explanation("lrp", images)
    rollout, _ = api_explanation("rollout", images)
    # the command ran batches of 2 + 1 images, the API one batch of 3: per-sample results do not depend on it
    for i in range(3):
        rel = np.load(out / "lrp" / f"img{i}.relevance.npy")
        assert rel.shape == (3, 64, 64)
        assert np.allclose(rel, lrp.relevance[i].numpy(), rtol=1e-4, atol=1e-6)
        assert np.allclose(np.load(out / "lrp" / f"img{i}.heatmap.npy"), lrp.heatmap[i].numpy(), rtol=1e-4, atol=1e-6)
        assert np.allclose(np.load(out / "rollout" / f"img{i}.heatmap.npy"), rollout.heatmap[i].numpy(), atol=1e-6)
        row = rows[2 * i]
        assert int(row["predicted"]) == int(logits[i].argmax())
        assert float(row["predicted_logit"]) == pytest.approx(float(logits[i].max()), rel=1e-5)
        assert float(row["predicted_prob"]) == pytest.approx(float(logits[i].softmax(0).max()), rel=1e-5)
        # heatmap_sum is the sum of the saved heatmap (for LRP: the relevance that reached the input)
        assert float(row["heatmap_sum"]) == pytest.approx(float(rel.sum(dtype=np.float64)), rel=1e-4)


def test_target_given_is_explained_for_every_image(lrp_run, images, tmp_path, capsys):
    from safetensors.numpy import load_file

    predicted = [int(r["predicted"]) for r in read_summary(lrp_run[3])[::2]]
    target = (predicted[0] + 1) % 6  # not image 0's predicted class
    out = tmp_path / "out"
    code, stdout, stderr = call([*images, "--model", "demo_vit", "--target", target, "--batch-size", "3",
                                 "--save-relevance", "safetensors", "--out", out], capsys)
    assert code == 0, stderr
    rows = read_summary(out)
    assert [int(r["target"]) for r in rows] == [target] * 3
    assert [int(r["predicted"]) for r in rows] == predicted  # the prediction is still reported
    assert f"; target {target} " in stdout.splitlines()[0]  # the line says that another class was explained
    given, _ = api_explanation("lrp", images, target=target)
    for i in range(3):
        saved = load_file(out / "lrp" / f"img{i}.safetensors")
        assert sorted(saved) == ["heatmap", "relevance"]
        assert np.allclose(saved["relevance"], given.relevance[i].numpy(), rtol=1e-4, atol=1e-6)
        # image 0 explained for another class than in the run without --target: another relevance
        same = np.allclose(saved["relevance"], np.load(lrp_run[3] / "lrp" / f"img{i}.relevance.npy"), atol=1e-6)
        assert same == (predicted[i] == target)


def test_cnn_with_several_methods(images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = call([images[0], "--model", "demo_cnn", "--method", "epsilon-gamma-box,gradient",
                                 "--out", out], capsys)
    assert code == 0, stderr
    assert len(stdout.strip().splitlines()) == 2
    for method in ("epsilon-gamma-box", "gradient"):
        with Image.open(out / method / "img0.png") as png:
            assert png.size == (64, 64)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A tiny registered timm ViT (test_vit, 160 x 160 input) with a 10-class head, saved both ways."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("test_vit", num_classes=10).eval()
    folder = tmp_path_factory.mktemp("weights")
    save_file(source.state_dict(), str(folder / "w.safetensors"))
    torch.save(source.state_dict(), folder / "w.pth")
    return source, folder / "w.safetensors", folder / "w.pth"


@pytest.mark.parametrize("kind, method", [("safetensors", "lrp"), ("pth", "input-x-gradient")])
def test_timm_model_with_local_weights(kind, method, timm_weights, images, tmp_path, capsys):
    source, safetensors_file, pth_file = timm_weights
    weights = safetensors_file if kind == "safetensors" else pth_file
    out = tmp_path / "out"
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {k}\n" for k in range(10)))
    extra = ["--labels", labels] if kind == "pth" else []
    code, stdout, stderr = call([images[0], "--model", "test_vit", "--weights", weights, "--method", method,
                                 "--out", out, *extra], capsys)
    assert code == 0, stderr
    assert "random weights" not in stderr
    with Image.open(out / method / "img0.png") as png:
        assert png.size == (160, 160)  # timm's data config of test_vit: resize to 168, center-crop 160
    _, prep = catalog.load_model("test_vit")
    with torch.no_grad():
        expected = source(prep.normalize(prep.load(images[0]))[None])[0]
    row = read_summary(out)[0]
    assert int(row["predicted"]) == int(expected.argmax())  # the 10-class head came from the file
    assert float(row["predicted_logit"]) == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-6)
    # 10 classes: no known names, unless --labels gives them
    assert row["predicted_name"] == (f"class {row['predicted']}" if kind == "pth" else "")


def test_random_weights_are_announced_and_seeded(images, tmp_path, capsys):
    logits = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        code, _, stderr = call([images[0], "--model", "test_vit", "--method", "gradient", "--seed", "7",
                                "--out", out], capsys)
        assert code == 0
        assert "no --weights given: test_vit has random weights (seed 7)" in stderr
        logits.append(read_summary(out)[0]["predicted_logit"])
    assert logits[0] == logits[1]  # same seed, same random model


# ------------------------------------------------------------------------------------------------------ errors

def check_error(capsys, argv, *needles, out=None):
    code, stdout, stderr = call(argv, capsys)
    assert code == 2
    assert stderr.startswith("lrpkit explain: error: "), stderr
    for needle in needles:
        assert needle in stderr, stderr
    if out is not None:
        assert not Path(out).exists()  # nothing written
    return stderr


def test_error_missing_image(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], tmp_path / "nope.png", "--model", "demo_vit", "--out", out],
                f"image not found: {tmp_path / 'nope.png'}", out=out)


def test_error_unreadable_image(tmp_path, capsys):
    fake = tmp_path / "x.png"
    fake.write_text("this is text, not a PNG")
    out = tmp_path / "out"
    check_error(capsys, [fake, "--model", "demo_vit", "--out", out], f"cannot read {fake} as an image",
                "Pillow", out=out)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_error_truncated_image_stops_before_anything_is_written(images, tmp_path, capsys, suffix):
    # a file whose header is fine but whose data stops half-way: Pillow opens it, decoding it fails
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"
    # one image per batch: without the check up front, the first image's results would be written already
    check_error(capsys, [images[0], cut, "--model", "demo_vit", "--batch-size", "1", "--out", out],
                f"cannot read {cut} as an image", out=out)


def test_error_missing_weights(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--weights", tmp_path / "w.safetensors", "--out", out],
                f"weights file not found: {tmp_path / 'w.safetensors'}", out=out)


def test_error_unknown_model_suggests_names(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "vit_tiny_patch16_22", "--out", out],
                "unknown model name 'vit_tiny_patch16_22'", "did you mean vit_tiny_patch16_224", out=out)


def test_error_weights_that_do_not_fit_name_the_keys(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--weights", WEIGHTS / "demo_cnn.safetensors",
                         "--out", out],
                "do not fit VisionTransformer", "missing keys ['blocks.0.", "more)]", "unexpected keys ['0.bias', '0.weight'",
                out=out)


class _OpensAFile:
    """Unpickling this object calls ``open(marker, "w")``: if lrpkit ever unpickled it, the marker would exist."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_error_pickled_object_is_refused_without_running_it(images, tmp_path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"head.weight": torch.zeros(6, 96), "payload": _OpensAFile(marker)}, weights)
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--weights", weights, "--out", out],
                "not a plain state dict", "never unpickles", out=out)
    assert not marker.exists()


def test_error_target_out_of_range(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--target", "6", "--out", out],
                "--target 6 is out of range: demo_vit has 6 classes, so the target must be in 0..5", out=out)
    check_error(capsys, [images[0], "--model", "demo_vit", "--target", "-1", "--out", out], "0..5", out=out)


def test_error_unknown_method(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--method", "lrp", "rolout", "--out", out],
                "unknown method 'rolout' (did you mean rollout", "choose from lrp, cplrp", out=out)


def test_error_transformer_only_method_on_a_cnn(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_cnn", "--method", "rollout", "--out", out],
                "method 'rollout' does not apply to Sequential", "needs a vision transformer", out=out)


def test_error_device(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--device", "gpu", "--out", out],
                "unknown device 'gpu'; use cpu, cuda", out=out)
    if not torch.cuda.is_available():
        check_error(capsys, [images[0], "--model", "demo_vit", "--device", "cuda", "--out", out],
                    "device 'cuda' is not available", "use --device cpu", out=out)


def test_error_bad_options(images, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, [images[0], "--model", "demo_vit", "--batch-size", "0", "--out", out],
                "--batch-size must be a positive int, got 0", out=out)
    check_error(capsys, [images[0], "--model", "demo_vit", "--cmap", "bwrr", "--out", out],
                "unknown colour map 'bwrr' (did you mean bwr", out=out)
    check_error(capsys, [images[0], "--model", "demo_vit", "--target", "circle", "--out", out],
                "--target 'circle' is not a class name of demo_vit", out=out)
    check_error(capsys, [images[0], "--model", "demo_vit", "--labels", tmp_path / "l.txt", "--out", out],
                f"labels file not found: {tmp_path / 'l.txt'}", out=out)


# ------------------------------------------------------------------------------------------------ the helpers

def test_method_names_accepts_lists_repeats_and_commas():
    assert explain.method_names(None) == ["lrp"]
    assert explain.method_names(["lrp", "rollout,gradient", "lrp"]) == ["lrp", "rollout", "gradient"]
    with pytest.raises(Exception, match=r"unknown method 'a.png'.*put the images before --method"):
        explain.method_names(["a.png"])


def test_output_names_are_unique(tmp_path):
    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/x.jpg"), Path("y.png")]
    assert explain.output_names(paths) == ["x", "x-2", "x-3", "y"]


def test_a_folder_gives_its_images_in_order(images, tmp_path):
    folder = images[0].parent
    (folder / "notes.txt").write_text("not an image")  # skipped: no image suffix
    assert explain.image_paths([str(folder)]) == sorted(images)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="holds no image files"):
        explain.image_paths([str(empty)])


def test_target_by_index_or_name():
    labels = ["disc", "square", "tench, Tinca tinca", "crane", "crane"]
    assert explain.resolve_target(None, 5, labels, "m") is None
    assert explain.resolve_target("1", 5, labels, "m") == 1
    assert explain.resolve_target("Square", 5, labels, "m") == 1  # case-insensitive
    assert explain.resolve_target("tinca tinca", 5, labels, "m") == 2  # any comma-separated name
    with pytest.raises(Exception, match=r"names several classes \(3, 4\)"):
        explain.resolve_target("crane", 5, labels, "m")
    with pytest.raises(Exception, match="has no class names; give an index in 0..4, or the names with --labels"):
        explain.resolve_target("disc", 5, None, "m")


def test_labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n")
    assert explain.read_labels(str(path), 2) == ["cat", "dog"]
    with pytest.raises(Exception, match="has 2 names but the model has 3 classes"):
        explain.read_labels(str(path), 3)


def test_error_out_is_a_file(images, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    check_error(capsys, [images[0], "--model", "demo_vit", "--out", out], f"--out {out} is a file; give a folder")
    assert out.read_text() == "a file"
