"""The engine of ``lrpkit evaluate`` (:mod:`lrpkit.evaluate.runner`): per-image rows equal the metrics computed
directly, the summary by hand, resuming without recomputation, refused configurations, the image-folder layout
and the device checks. All on the bundled demo ViT (64x64 inputs, patch 8) with a few generated images."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lrpkit import catalog, data, evaluate, methods
from lrpkit.app import method_registry
from lrpkit.evaluate import runner
from lrpkit.evaluate.distributed import resolve_device, shard
from lrpkit.evaluate.report import format_summary, summarize
from lrpkit.evaluate.runner import run_evaluation
from lrpkit.evaluate.sources import GeneratedImages, ImageFolder
from lrpkit.evaluate.store import parameter_digest

FAST = ["gradient", "rollout"]  # both give exactly the same heatmap in any batch
MAKE_METHOD = catalog.make_method  # the real one, before any monkeypatch


@pytest.fixture(scope="module")
def demo():
    model, prep = catalog.load_model("demo_vit")
    return model, prep


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_rows_close(a, b, tol=1e-5):
    """Two CSV tables with the same (image, method) order and numbers equal to float tolerance."""
    assert [(r["image"], r["method"]) for r in a] == [(r["image"], r["method"]) for r in b]
    for ra, rb in zip(a, b):
        for key in runner.METRICS:
            if ra[key] == "" or rb[key] == "":
                assert ra[key] == rb[key], key
            else:
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=tol, abs=tol), (ra["image"], key)


# ---------------------------------------------------------------------------------------------- by hand
def test_summary_by_hand():
    rows = [
        {"method": "a", "abpc": 1.0, "mass": None, "morf_curve": [0.0, 2.0], "lerf_curve": [4.0, 0.0]},
        {"method": "a", "abpc": 2.0, "mass": float("nan"), "morf_curve": [2.0, 4.0], "lerf_curve": [2.0, 2.0]},
        {"method": "a", "abpc": 3.0, "mass": 0.5, "morf_curve": [1.0, 0.0], "lerf_curve": [0.0, 1.0]},
    ]
    s = summarize(rows, ["a", "b"])
    # abpc 1, 2, 3: mean 2, std sqrt(((1-2)² + 0 + (3-2)²) / (3 - 1)) = 1
    assert s["a"]["abpc"] == {"mean": 2.0, "std": 1.0, "n": 3}
    # mass defined on one image only (None and NaN are skipped): mean 0.5, no std
    assert s["a"]["mass"] == {"mean": 0.5, "std": None, "n": 1}
    assert s["a"]["pointing"] == {"mean": None, "std": None, "n": 0}
    assert s["a"]["images"] == 3
    # mean curves point by point: ((0+2+1)/3, (2+4+0)/3) = (1, 2); ((4+2+0)/3, (0+2+1)/3) = (2, 1)
    assert s["a"]["morf_curve"] == [1.0, 2.0]
    assert s["a"]["lerf_curve"] == [2.0, 1.0]
    assert s["b"]["images"] == 0 and s["b"]["morf_curve"] is None
    table = format_summary(s)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "images", "ABPC", "↑"]
    assert "2.000 ± 1.000" in lines[1]
    assert "0.500 (n=1)" in lines[1]  # mass: one value of three images
    assert lines[2].split()[:3] == ["b", "0", "n/a"]


def test_shard_by_hand():
    assert shard([10, 11, 12, 13, 14], 0, 2) == [10, 12, 14]
    assert shard([10, 11, 12, 13, 14], 1, 2) == [11, 13]
    parts = [shard(list(range(7)), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(7))  # every item exactly once
    assert shard([1, 2], 0, 1) == [1, 2]


def test_parameter_digest_tracks_the_weights(demo):
    model, _ = demo
    a = parameter_digest(model)
    other = torch.nn.Linear(2, 2)
    copy = __import__("copy").deepcopy(model)
    assert parameter_digest(copy) == a
    with torch.no_grad():
        copy.head.bias[0] += 1e-3
    assert parameter_digest(copy) != a
    assert parameter_digest(other) != a


# ------------------------------------------------------------------------------------- rows and outputs
def test_rows_equal_the_metrics_computed_directly(tmp_path, demo):
    model, prep = demo
    res = run_evaluation(tmp_path, n=3, seed=5, methods=FAST, batch_size=2)
    assert res.complete and res.computed == 6 and res.reused == 0
    rows = {(r["image"], r["method"]): r for r in res.rows}

    # image 2 alone, rollout, computed without the runner
    sample = data.make_sample(2, seed=5)
    x01 = sample.image[None]
    x = data.normalize(x01)
    target = model(x).argmax(1)
    heat = methods.AttentionRollout(model)(x, target).heatmap.detach()
    curves = evaluate.perturbation_curves(model, x01, heat, target, patch_size=8, steps=16,
                                          preprocess=data.normalize)
    rise = evaluate.deletion_insertion(model, x01, heat, target, steps=32, preprocess=data.normalize)
    mask = sample.mask[None]
    row = rows[("2", "rollout")]
    assert row["target"] == int(target) and row["label"] == sample.label and row["has_mask"] is True
    expected = {"abpc": curves.abpc, "morf": curves.auc_morf, "lerf": curves.auc_lerf,
                "deletion": rise.auc_deletion, "insertion": rise.auc_insertion,
                "pointing": evaluate.pointing_game(heat, mask), "mass": evaluate.relevance_mass_accuracy(heat, mask),
                "rank": evaluate.relevance_rank_accuracy(heat, mask)}
    for key, value in expected.items():
        assert row[key] == pytest.approx(float(value[0]), rel=1e-5, abs=1e-6), key
    assert row["morf_curve"] == pytest.approx(curves.morf[0].tolist(), rel=1e-5, abs=1e-6)
    # both curves start at the unperturbed target logit and end at the fully removed image (all zeros)
    with torch.no_grad():
        logit = float(model(x)[0, target[0]])
        zero_logit = float(model(data.normalize(torch.zeros_like(x01)))[0, target[0]])
    for curve in ("morf_curve", "lerf_curve"):
        assert row[curve][0] == pytest.approx(logit, rel=1e-5)
        assert row[curve][-1] == pytest.approx(zero_logit, rel=1e-5)
        assert len(row[curve]) == 17  # 16 steps + the unperturbed image

    # CSV: one row per (image, method), image-major, the numbers of the rows
    table = read_csv(tmp_path / "results.csv")
    assert list(table[0]) == list(runner.CSV_COLUMNS)
    assert [(r["image"], r["method"]) for r in table] == [(i, m) for i in "012" for m in FAST]
    assert float(table[5]["abpc"]) == row["abpc"]

    # JSON: configuration and summary; the mean is the mean of the CSV column, the curves the mean curves
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["config"]["model"] == "demo_vit" and doc["config"]["seed"] == 5 and doc["config"]["patch_size"] == 8
    assert doc["complete"] is True and doc["pairs_done"] == doc["pairs_total"] == 6
    col = [float(r["deletion"]) for r in table if r["method"] == "gradient"]
    mean = sum(col) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in col) / 2)
    assert doc["summary"]["gradient"]["deletion"]["mean"] == pytest.approx(mean)
    assert doc["summary"]["gradient"]["deletion"]["std"] == pytest.approx(std)
    assert doc["summary"]["gradient"]["deletion"]["n"] == 3
    first = [rows[(i, "rollout")]["lerf_curve"][1] for i in "012"]
    assert doc["summary"]["rollout"]["lerf_curve"][1] == pytest.approx(sum(first) / 3)
    assert doc["fractions"][0] == 0 and doc["fractions"][-1] == 1 and len(doc["fractions"]) == 17

    # the plot is a real PNG
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
    assert "rollout" in res.table and "gradient" in res.table


def test_rows_do_not_depend_on_the_batch_for_seeded_methods(tmp_path):
    # SmoothGrad and ViT-CX reseed their generator for every sample: batch 1 and batch 2 give the same rows
    one = run_evaluation(tmp_path / "one", n=2, methods=["smoothgrad", "vitcx"], batch_size=1)
    two = run_evaluation(tmp_path / "two", n=2, methods=["smoothgrad", "vitcx"], batch_size=2)
    assert one.rows[0]["image"] == "0"
    assert_rows_close(read_csv(tmp_path / "one" / "results.csv"), read_csv(tmp_path / "two" / "results.csv"))


# ------------------------------------------------------------------------------------------- resuming
class Counting:
    """Wraps make_method (in lrpkit.app.method_registry, where the runner looks it up): counts the images each method explains and can fail after some of them."""

    def __init__(self, monkeypatch, fail_method=None, fail_after=None, exc=RuntimeError):
        self.calls: dict[str, int] = {}
        self.fail_method, self.fail_after, self.exc = fail_method, fail_after, exc
        real = MAKE_METHOD

        def make(name, model, prep, seed=0):
            explainer = real(name, model, prep, seed)

            def explain(x, target=None):
                done = self.calls.get(name, 0)
                if name == self.fail_method and done >= self.fail_after:
                    raise self.exc("simulated crash")
                self.calls[name] = done + x.shape[0]
                return explainer(x, target)

            return explain

        monkeypatch.setattr(method_registry, "make_method", make)


def test_resume_after_a_crash_recomputes_nothing(tmp_path, monkeypatch):
    full = run_evaluation(tmp_path / "full", n=5, methods=FAST, batch_size=2)
    out = tmp_path / "run"
    crash = Counting(monkeypatch, fail_method="rollout", fail_after=2)
    # batch [0, 1]: gradient, rollout written; batch [2, 3]: gradient written, rollout crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_evaluation(out, n=5, methods=FAST, batch_size=2)
    assert crash.calls == {"gradient": 4, "rollout": 2}
    before = (out / "results.jsonl").read_text().splitlines()
    assert [(json.loads(line)["image"], json.loads(line)["method"]) for line in before] == [
        ("0", "gradient"), ("1", "gradient"), ("0", "rollout"), ("1", "rollout"), ("2", "gradient"),
        ("3", "gradient")]

    again = Counting(monkeypatch)
    res = run_evaluation(out, n=5, methods=FAST, batch_size=2)
    # only the missing pairs: gradient on image 4; rollout on images 2, 3, 4
    assert again.calls == {"gradient": 1, "rollout": 3}
    assert res.computed == 4 and res.reused == 6 and res.complete
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:6] == before and len(after) == 10  # appended, nothing rewritten or duplicated
    assert_rows_close(read_csv(out / "results.csv"), read_csv(tmp_path / "full" / "results.csv"))
    assert res.table == full.table


def test_limit_writes_partial_outputs_then_resumes(tmp_path):
    part = run_evaluation(tmp_path, n=3, methods=FAST, limit=1)
    assert not part.complete and part.computed == 2 and [r["image"] for r in part.rows] == ["0", "0"]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert (doc["complete"], doc["pairs_done"], doc["pairs_total"]) == (False, 2, 6)
    rest = run_evaluation(tmp_path, n=3, methods=FAST)
    assert rest.complete and rest.computed == 4 and rest.reused == 2


def test_more_images_and_methods_reuse_earlier_rows(tmp_path, monkeypatch):
    run_evaluation(tmp_path, n=2, methods=["gradient"])
    counts = Counting(monkeypatch)
    res = run_evaluation(tmp_path, n=3, methods=["gradient", "rollout"])
    assert counts.calls == {"gradient": 1, "rollout": 3}  # image 2 for gradient; all three for rollout
    assert res.reused == 2 and res.computed == 4 and len(res.rows) == 6
    # fewer images than computed: the outputs cover the asked scope, the rows stay in results.jsonl
    small = run_evaluation(tmp_path, n=1, methods=["rollout"])
    assert small.computed == 0 and [(r["image"], r["method"]) for r in small.rows] == [("0", "rollout")]
    assert len(read_csv(tmp_path / "results.csv")) == 1
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6


def test_a_cut_off_line_is_skipped_and_recomputed(tmp_path, monkeypatch):
    run_evaluation(tmp_path, n=2, methods=["gradient"])
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:40])  # the crash cut the second row
    counts = Counting(monkeypatch)
    res = run_evaluation(tmp_path, n=2, methods=["gradient"])
    assert counts.calls == {"gradient": 1} and res.complete
    text = path.read_text().splitlines()
    assert text[1] == lines[1][:40] and json.loads(text[2])["image"] == "1"  # new row on its own line


def test_a_different_configuration_is_refused(tmp_path, demo):
    run_evaluation(tmp_path, n=2, seed=1000, methods=["gradient"])
    with pytest.raises(ValueError, match=r"--seed: 1000 there, 7 now.*--overwrite"):
        run_evaluation(tmp_path, n=2, seed=7, methods=["gradient"])
    with pytest.raises(ValueError, match=r"--steps: 16 there, 8 now"):
        run_evaluation(tmp_path, n=2, methods=["gradient"], steps=8)
    with pytest.raises(ValueError, match=r"--model: 'demo_vit' there, 'demo_cnn' now"):
        run_evaluation(tmp_path, n=2, methods=["gradient"], model="demo_cnn")
    res = run_evaluation(tmp_path, n=2, seed=7, methods=["gradient"], overwrite=True)
    assert res.computed == 2 and res.reused == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # the rows of seed 1000 are gone
    assert json.loads((tmp_path / "config.json").read_text())["identity"]["seed"] == 7


def test_other_weights_are_refused_and_the_users_model_is_untouched(tmp_path, demo):
    model, prep = demo
    model = __import__("copy").deepcopy(model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_evaluation(tmp_path, model=model, preprocess=prep, n=1, methods=["gradient"])
    assert model.training  # not switched to eval
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.head.bias[0] += 0.5
    with pytest.raises(ValueError, match=r"--model/--weights \(the model's parameters\)"):
        run_evaluation(tmp_path, model=model, preprocess=prep, n=1, methods=["gradient"])
    with pytest.raises(ValueError, match="preprocess"):
        run_evaluation(tmp_path / "x", model=model, n=1, methods=["gradient"])


def test_results_without_config_are_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="no config.json"):
        run_evaluation(tmp_path, n=1, methods=["gradient"])


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--steps must be an int from 1 to 64 \(the number of regions of 8 px"):
        run_evaluation(tmp_path, n=1, methods=["gradient"], steps=100)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        run_evaluation(tmp_path, n=1, methods=["gradient"], batch_size=0)
    with pytest.raises(ValueError, match="n \\(the number of generated images\\) must be a positive int"):
        run_evaluation(tmp_path, n=0, methods=["gradient"])
    with pytest.raises(ValueError, match="unknown method 'gradinet'.*did you mean gradient"):
        run_evaluation(tmp_path, n=1, methods=["gradinet"])
    with pytest.raises(ValueError, match="'all' cannot be combined"):
        run_evaluation(tmp_path, n=1, methods=["all", "gradient"])
    with pytest.raises(ValueError, match="does not apply to Sequential"):
        run_evaluation(tmp_path, n=1, model="demo_cnn", methods=["rollout"])


def test_default_and_all_methods_follow_the_model(demo):
    model, prep = demo
    cnn, cnn_prep = catalog.load_model("demo_cnn")
    notes = []
    built = runner._methods(None, cnn, cnn_prep, 0, notes.append)
    assert list(built) == list(runner.DEFAULT_METHODS_CNN)
    built = runner._methods("all", cnn, cnn_prep, 0, notes.append)
    transformer_only = {"transformer-attribution", "partial-lrp", "rollout", "gradient-rollout", "raw-attention",
                        "attention-gradcam", "generic-attention", "vitcx"}
    assert list(built) == [m for m in catalog.METHODS if m not in transformer_only]
    assert sum(n.startswith("skipping ") for n in notes) == len(transformer_only)
    assert list(runner._methods(None, model, prep, 0, notes.append)) == list(runner.DEFAULT_METHODS_VIT)


# ----------------------------------------------------------------------------------------- image folder
def save_rgb(path, x01):
    Image.fromarray((x01.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def save_mask(path, mask, mode="L"):
    arr = mask.numpy().astype(np.uint8) * 255
    if mode == "RGBA":  # black background, white object, opaque everywhere: the alpha must be ignored
        rgba = np.stack([arr, arr, arr, np.full_like(arr, 255)], -1)
        Image.fromarray(rgba, "RGBA").save(path)
    else:
        Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, name in enumerate(["b_second", "a_first"]):
        s = data.make_sample(k, seed=1000)
        save_rgb(root / "images" / f"{name}.png", s.image)
    save_mask(root / "masks" / "b_second.png", data.make_sample(0, seed=1000).mask, mode="RGBA")
    return root


def test_image_folder_reads_images_and_masks(folder, demo):
    _, prep = demo
    src = ImageFolder(folder, prep)
    assert src.ids == ["a_first.png", "b_second.png"]  # sorted by file name
    batch = src.load([0, 1])
    s = data.make_sample(0, seed=1000)  # b_second
    assert batch.has_mask == [False, True]
    assert torch.equal(batch.masks[1], s.mask)  # the mask comes back exactly (64x64: no resize)
    assert not batch.masks[0].any()
    assert (batch.x01[1] - s.image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    assert batch.labels == [None, None]


def test_masks_follow_the_image_resize_and_crop(tmp_path, demo):
    _, prep = demo  # resize the shorter side to 64, center crop 64x64
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (128, 96)).save(root / "images" / "wide.png")
    mask = torch.zeros(96, 128, dtype=torch.bool)
    mask[:48, 16:64] = True  # rows 0..47, columns 16..63
    save_mask(root / "masks" / "wide.png", mask)
    m = ImageFolder(root, prep).load_mask("wide.png")
    # 96x128 -> 64x85; nearest neighbour: output pixel (i, j) reads input (floor(1.5·i), floor(128/85·j)).
    # rows: floor(1.5·i) < 48  <=>  i <= 31.  columns: 16 <= floor(1.50588·j) <= 63  <=>  11 <= j <= 42
    # (10·1.506 = 15.06, 11·1.506 = 16.56; 42·1.506 = 63.25, 43·1.506 = 64.75). The center crop to 64 columns
    # starts at int(round((85 - 64) / 2)) = round(10.5) = 10 (half to even), so columns 1..32 of the result.
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:32, 1:33] = True
    assert m.shape == (64, 64)
    assert torch.equal(m, expected)


def test_folder_evaluation_scores_localisation_only_with_a_mask(tmp_path, folder):
    res = run_evaluation(tmp_path / "out", data=folder, methods=["rollout"])
    rows = {r["image"]: r for r in res.rows}
    assert rows["a_first.png"]["pointing"] is None and rows["a_first.png"]["abpc"] is not None
    assert rows["b_second.png"]["pointing"] in (0.0, 1.0) and rows["b_second.png"]["mass"] is not None
    table = read_csv(tmp_path / "out" / "results.csv")
    assert table[0]["image"] == "a_first.png" and table[0]["pointing"] == "" and table[0]["label"] == ""
    s = res.summary["rollout"]
    assert s["images"] == 2 and s["pointing"]["n"] == 1 and s["abpc"]["n"] == 2
    assert res.config["source"] == "folder" and res.config["data"] == str(folder.resolve())


def test_folder_errors_name_the_problem(tmp_path, folder, demo):
    _, prep = demo
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        ImageFolder(tmp_path / "nope", prep)
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no images/ folder.*DIR/images/NAME.png"):
        ImageFolder(tmp_path / "flat", prep)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "images" / ".hidden").write_text("x")
    with pytest.raises(ValueError, match="no images in"):
        ImageFolder(tmp_path / "empty", prep)

    save_mask(folder / "masks" / "a_first.png", torch.zeros(32, 48, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"a_first.png is 48x32 pixels but its image .*is 64x64"):
        ImageFolder(folder, prep)
    (folder / "masks" / "a_first.png").unlink()

    (folder / "masks" / "c_orphan.png").write_bytes((folder / "masks" / "b_second.png").read_bytes())
    with pytest.raises(ValueError, match="c_orphan.png has no image"):
        ImageFolder(folder, prep)
    (folder / "masks" / "c_orphan.png").unlink()

    (folder / "images" / "a_first.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="two image files named 'a_first'"):
        ImageFolder(folder, prep)
    (folder / "images" / "a_first.jpg").unlink()

    (folder / "images" / "notes.png").write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match="cannot read image .*notes.png"):
        ImageFolder(folder, prep)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_folder_check_decodes_every_image(tmp_path, folder, demo, suffix):
    # a file whose header is fine but whose data stops half-way: Pillow opens it and (for a JPEG) verify() passes;
    # without decoding it up front, a long run would stop only when it reached this image
    _, prep = demo
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = folder / "images" / f"z_cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read image .*z_cut"):
        ImageFolder(folder, prep)


def test_generated_images_do_not_depend_on_n():
    a = GeneratedImages(3, seed=4, size=64).load([2])
    b = GeneratedImages(9, seed=4, size=64).load([2])
    assert torch.equal(a.x01, b.x01) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.x01[0], data.make_sample(2, seed=4).image)


# ------------------------------------------------------------------------------------------------ devices
def test_device_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"'cuda' is not available.*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'; use cpu, cuda"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # torchrun: one GPU per local rank
