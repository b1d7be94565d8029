import json

import pytest

import predict


def test_predict_reports_metrics_and_saves_comparisons(trained_run, tmp_path, capsys):
    predict.main(["--checkpoint", str(trained_run), "--out", str(tmp_path), "--examples", "3"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 6  # the whole test split of the fixture (from config.json)
    for metric in ("ssim", "psnr_db", "foreground_psnr_db"):
        stats = report[metric]
        assert stats["min"] <= stats["p5"] <= stats["median"] and stats["min"] <= stats["mean"]
    assert 0 < report["codebook_usage"] <= 1 and report["perplexity"] >= 1
    assert report["images_per_second"] > 0
    assert sorted(p.name for p in tmp_path.glob("comparison_*.png")) == [
        "comparison_000.png", "comparison_001.png", "comparison_002.png", "comparison_grid.png"]
    assert "ssim" in capsys.readouterr().out


def test_predict_on_an_explicit_test_folder_with_last_weights(trained_run, oasis_root, tmp_path):
    predict.main(["--checkpoint", str(trained_run), "--weights", "last", "--out", str(tmp_path),
                  "--test-dir", str(oasis_root / "keras_png_slices_validate")])
    assert json.loads((tmp_path / "report.json").read_text())["images"] == 8


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint must be the --out folder"):
        predict.main(["--checkpoint", str(tmp_path)])


def test_bad_predict_flags_and_paths_exit_with_a_clear_message(trained_run, capsys):
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(trained_run), "--examples", "0"])
    assert "--examples must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no/such/folder does not exist"):
        predict.main(["--checkpoint", str(trained_run), "--test-dir", "no/such/folder"])


def test_a_damaged_checkpoint_is_reported_not_crashed_on(trained_run, tmp_path):
    for name in ("config.json", "state.json"):
        (tmp_path / name).write_bytes((trained_run / name).read_bytes())
    (tmp_path / "last.keras").write_bytes(b"not a keras file")
    with pytest.raises(SystemExit, match="could not load .*last.keras"):
        predict.main(["--checkpoint", str(tmp_path), "--weights", "last"])
    with pytest.raises(SystemExit, match="Try --weights last"):
        predict.main(["--checkpoint", str(tmp_path)])
