"""``lrpkit demo`` (the README's main job) runs end to end on a few images."""

from lrpkit import cli, demo


def test_demo_command_writes_figure_and_table(tmp_path, capsys):
    table = tmp_path / "table.md"
    assert cli.main(["demo", "--n", "2", "--no-vitcx", "--out", str(tmp_path), "--table", str(table)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "figure written to" in printed
    rows = table.read_text().splitlines()
    assert len(rows) == 2 + 17  # header, separator, one row per method without ViT-CX
    assert rows[2].startswith("| LRP CP-ε |")


def test_summary_skips_undefined_values():
    import torch

    # mass accuracy is NaN for a heatmap without positive relevance: mean of (0.5, 1.0) = 0.75, std 0.354
    assert demo._summary(torch.tensor([0.5, float("nan"), 1.0])) == "0.750 ± 0.354 (1 n/a)"
