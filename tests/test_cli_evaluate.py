"""``lrpkit evaluate`` on the command line: outputs, resuming, partial runs, and each user error as one line with
exit status 2. The engine itself is tested in test_evaluate_runner.py."""

import csv
import json

import pytest
import torch

from lrpkit import catalog, cli
from lrpkit.app import method_registry

MAKE_METHOD = catalog.make_method


def evaluate(*args):
    return cli.main(["evaluate", *map(str, args)])


def test_evaluate_writes_table_csv_json_and_plot_then_resumes(tmp_path, capsys):
    out = tmp_path / "ev"
    assert evaluate("--n", 2, "--method", "gradient", "rollout", "--out", out, "--quiet") == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("metrics over 2 images x 2 methods")
    assert lines[1].split()[:4] == ["method", "images", "ABPC", "↑"]
    assert lines[2].split()[:2] == ["gradient", "2"] and lines[3].split()[:2] == ["rollout", "2"]
    assert "4 pairs computed in this run, 0 found in" in printed
    for name in ("results.csv", "summary.json", "curves.png", "results.jsonl", "config.json"):
        assert str(out / name) in printed or name == "config.json"
        assert (out / name).stat().st_size > 0
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    doc = json.loads((out / "summary.json").read_text())
    assert doc["methods"] == ["gradient", "rollout"] and doc["summary"]["rollout"]["abpc"]["n"] == 2

    # the same command again: nothing to compute, the same table
    assert evaluate("--n", 2, "--method", "gradient", "rollout", "--out", out, "--quiet") == 0
    again = capsys.readouterr().out
    assert "0 pairs computed in this run, 4 found in" in again
    assert again.splitlines()[1:4] == lines[1:4]


def test_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    calls = {}

    def make(name, model, prep, seed=0):
        explainer = MAKE_METHOD(name, model, prep, seed)

        def explain(x, target=None):
            if sum(calls.values()) >= 2:
                raise KeyboardInterrupt  # Ctrl-C during the third call
            calls[name] = calls.get(name, 0) + x.shape[0]
            return explainer(x, target)

        return explain

    monkeypatch.setattr(method_registry, "make_method", make)
    args = ["--n", 3, "--method", "gradient", "--batch-size", 1, "--out", tmp_path, "--quiet"]
    assert evaluate(*args) == 130
    assert "interrupted; the finished images are saved" in capsys.readouterr().err
    assert calls == {"gradient": 2}
    calls.clear()
    monkeypatch.setattr(method_registry, "make_method", MAKE_METHOD)
    assert evaluate(*args) == 0
    assert "1 pairs computed in this run, 2 found in" in capsys.readouterr().out


def test_limit_reports_a_partial_table(tmp_path, capsys):
    assert evaluate("--n", 2, "--method", "gradient", "--limit", 1, "--out", tmp_path, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "partial: 1 of 2 (image, method) pairs are done; rerun the same command to go on" in printed


def test_all_methods_on_the_demo_cnn_skip_the_transformer_methods(tmp_path, capsys):
    assert evaluate("--model", "demo_cnn", "--method", "all", "--n", 1, "--out", tmp_path) == 0
    captured = capsys.readouterr()
    assert "skipping rollout: method 'rollout' does not apply to Sequential" in captured.err
    with open(tmp_path / "results.csv", newline="") as f:
        got = [r["method"] for r in csv.DictReader(f)]
    assert "rollout" not in got and "vitcx" not in got and got[:2] == ["lrp", "cplrp"] and len(got) == 12
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["patch_size"] == 8  # CNN, 64 px input


@pytest.mark.parametrize("args, message", [
    (["--method", "gradinet"], "unknown method 'gradinet' (did you mean gradient"),
    (["--data", "{tmp}/missing"], "data folder not found"),
    (["--data", "{tmp}/empty"], "no images in"),
    (["--device", "cuda"], "'cuda' is not available on this machine"),
    (["--device", "tpu7"], "unknown device 'tpu7'"),
    (["--steps", "100"], "--steps must be an int from 1 to 64"),
    (["--model", "vit_tiny_patch16_2244"], "unknown model name 'vit_tiny_patch16_2244'"),
    (["--weights", "{tmp}/w.safetensors"], "weights file not found"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    args = [a.format(tmp=tmp_path) for a in args]
    assert evaluate("--n", 1, "--out", tmp_path / "out", "--quiet", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpkit evaluate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_other_options_are_refused_until_overwrite(tmp_path, capsys):
    assert evaluate("--n", 1, "--method", "gradient", "--out", tmp_path, "--quiet") == 0
    capsys.readouterr()
    assert evaluate("--n", 1, "--method", "gradient", "--seed", 3, "--out", tmp_path, "--quiet") == 2
    err = capsys.readouterr().err
    assert "holds results of a different configuration (--seed: 1000 there, 3 now)" in err
    assert "pass --overwrite to start again" in err
    assert evaluate("--n", 1, "--method", "gradient", "--seed", 3, "--out", tmp_path, "--quiet",
                    "--overwrite") == 0
    assert "1 pairs computed in this run, 0 found" in capsys.readouterr().out


def test_num_images_is_an_alias_of_n(tmp_path, capsys):
    # under torchrun the spelling --num-images is needed (torchrun's parser takes --n for its own options)
    assert evaluate("--num-images", 1, "--method", "rollout", "--out", tmp_path, "--quiet") == 0
    assert "metrics over 1 images x 1 methods" in capsys.readouterr().out


def test_a_file_system_error_is_one_line(tmp_path, capsys, monkeypatch):
    # e.g. an --out folder the user may not write to (as root no folder is read-only, so the write is made to fail)
    import lrpkit.commands.evaluate as command

    def refuse(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "results.csv"))

    monkeypatch.setattr(command, "run", refuse)
    assert cli.main(["evaluate", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpkit evaluate: error: ") and "Permission denied" in err and "results.csv" in err
    assert len(err.strip().splitlines()) == 1
