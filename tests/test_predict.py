import json
import re

import keras
import numpy as np
import pytest
from skimage.metrics import structural_similarity
from PIL import Image

import dataset
import predict
from conftest import TINY, write_slices
from test_train import change_best_vqvae, copy_run


def strict_json(path):
    """JSON as a strict reader takes it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_predict_reports_metrics_and_saves_comparisons(trained_run, tmp_path, capsys):
    predict.main(["--checkpoint", str(trained_run), "--out", str(tmp_path), "--examples", "3"])
    report = strict_json(tmp_path / "report.json")
    assert report["images"] == 6  # the whole test split of the fixture (from config.json)
    # every number recomputed independently: scikit-image SSIM, PSNR and usage by hand
    model = keras.models.load_model(trained_run / "best.keras")
    paths = dataset.list_images(json.loads((trained_run / "config.json").read_text())
                                ["splits"]["test"])
    images = dataset.fixed_batch(paths, 32, len(paths))
    reconstructions = model.predict(images, verbose=0)
    ssim = [structural_similarity(a[..., 0], b[..., 0], data_range=1.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
            for a, b in zip(images, reconstructions)]
    psnr = 10 * np.log10(1.0 / ((images - reconstructions) ** 2).mean(axis=(1, 2, 3)))
    for name, values in (("ssim", ssim), ("psnr_db", psnr)):
        stats = report[name]
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-3), name
        assert stats["min"] == pytest.approx(np.min(values), abs=1e-3), name
        assert stats["median"] == pytest.approx(np.median(values), abs=1e-3), name
    codes = model.encode(images).numpy()
    assert report["codebook_usage"] == pytest.approx(len(np.unique(codes)) / 16)
    assert report["codebook_size"] == 16
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
    with pytest.raises(SystemExit, match="last.keras is not a Keras model file"):
        predict.main(["--checkpoint", str(tmp_path), "--weights", "last"])
    with pytest.raises(SystemExit, match="Try --weights last"):
        predict.main(["--checkpoint", str(tmp_path)])


def test_generate_writes_samples_a_grid_and_every_metric(trained_run, tmp_path, capsys):
    predict.main(["--checkpoint", str(trained_run), "--generate", "4", "--out", str(tmp_path)])
    samples = sorted(tmp_path.glob("sample_*.png"))
    assert [p.name for p in samples] == [f"sample_{i:03d}.png" for i in range(4)]
    pixels = np.array(Image.open(samples[0]))
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
    assert pixels.max() > 1  # 0..255 grey levels, not the 0..1 floats cast to bytes
    assert (tmp_path / "samples_grid.png").exists()
    beside_real = Image.open(tmp_path / "samples_and_real.png")  # 3 samples over 3 real slices
    assert beside_real.height > beside_real.width / 3 * 1.5
    report = json.loads((tmp_path / "generation_report.json").read_text())
    assert report["samples"] == 4 and report["code_map"] == [8, 8]
    assert report["images_per_second"] > 0
    found = report["metrics"]
    assert found["images_compared"] == 3  # half of the fixture's 6 test slices
    bits = found["bits_per_test_code"]
    assert bits["uniform"] == 4.0 and 0 < bits["prior"] < 6 and 0 < bits["unigram"] <= 4.5
    assert 0 < bits["position_unigram"] < 8
    diversity = found["mean_pairwise_ms_ssim"]
    assert set(diversity) == {"samples", "real_test", "real_test_other_half",
                              "test_reconstructions"}
    assert all(0 <= value <= 1 for value in diversity.values())
    assert len(set(diversity.values())) == 4  # four different sets of slices
    assert set(found["nearest_training_ssim"]) == {"samples", "real_test",
                                                   "test_reconstructions"}
    for stats in found["nearest_training_ssim"].values():
        assert -1 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1
    compared = {"samples", "real_test_other_half", "test_reconstructions", "shuffled_codes"}
    for suffix in ("", "_second_cnn", "_standardised"):
        distances, means = found["frechet_distance" + suffix], found["frechet_mean_term" + suffix]
        assert set(distances) == set(means) == compared
        assert all(np.isfinite(d) and d > -1e-6 for d in distances.values())
        assert all(0 <= means[name] <= distances[name] + 1e-6 for name in compared)
    assert found["frechet_distance"] != found["frechet_distance_second_cnn"]
    assert found["frechet_distance_standardised"] != found["frechet_distance"]
    assert set(found["brain_intensity"]) == compared | {"real_test"}
    assert all(0 <= value <= 1 for value in found["brain_intensity"].values())
    histogram = found["brain_histogram"]
    assert set(histogram) == compared | {"real_test", "bins"} and histogram["bins"][0] == 0.05
    for name in compared | {"real_test"}:
        assert len(histogram[name]) == 6 and abs(sum(histogram[name]) - 1) < 1e-6
    assert set(found["dark_islands"]) == compared | {"real_test"}
    assert all(value >= 0 for value in found["dark_islands"].values())
    printed = capsys.readouterr().out
    for words in ("images/s", "bits/code", "MS-SSIM", "nearest training slice", "Frechet",
                  "a second random CNN", "mean term", "inside the brain", "standardised", "(CSF)",
                  "dark islands"):
        assert words in printed
    assert re.search(r"diversity, .*; reference: test reconstructions \d\.\d{3} \(their real "
                     r"slices \d\.\d{3}\)\n", printed)


def test_generate_without_metrics_only_samples(trained_run, tmp_path):
    predict.main(["--checkpoint", str(trained_run), "--generate", "2", "--no-metrics",
                  "--top-k", "3", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "generation_report.json").read_text())
    assert "metrics" not in report and report["top_k"] == 3
    assert len(list(tmp_path.glob("sample_*.png"))) == 2


def test_a_top_k_beyond_the_codebook_is_refused_with_its_size(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--top-k 100000 is more than the 16 codes"):
        predict.main(["--checkpoint", str(trained_run), "--generate", "2", "--no-metrics",
                      "--top-k", "100000", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        predict.main(["--generate", "2", "--top-k", "-1"])
    assert "--top-k must be 0" in capsys.readouterr().err


def test_generate_without_a_prior_says_how_to_train_one(trained_run, tmp_path):
    for name in ("config.json", "state.json", "best.keras"):
        (tmp_path / name).write_bytes((trained_run / name).read_bytes())
    with pytest.raises(SystemExit, match="this run has no prior.*--prior-only"):
        predict.main(["--checkpoint", str(tmp_path), "--generate", "2"])


def test_too_few_test_slices_are_refused_before_sampling(trained_run, tmp_path):
    few = write_slices(tmp_path / "few", 3)
    with pytest.raises(SystemExit, match="at least 4 test slices"):
        predict.main(["--checkpoint", str(trained_run), "--generate", "2", "--test-dir",
                      str(few), "--out", str(tmp_path / "gen")])
    assert not list((tmp_path / "gen").glob("sample_*.png"))  # nothing was sampled


def test_generate_refuses_a_vqvae_that_changed_under_its_prior(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "run")
    change_best_vqvae(out)
    with pytest.raises(SystemExit, match="best.keras changed after prior_best.keras was trained"):
        predict.main(["--checkpoint", str(out), "--generate", "2", "--no-metrics",
                      "--out", str(tmp_path / "gen")])


def test_a_mixed_bfloat16_run_with_blank_slices_trains_predicts_and_generates(tmp_path):
    """The precision the README's numbers come from, end to end, on splits that each hold an
    all-black slice (a perfect reconstruction of it must not stop training or break JSON)."""
    root = tmp_path / "keras_png_slices_data"
    for seed, (split, count) in enumerate({"train": 16, "validate": 6, "test": 6}.items()):
        folder = write_slices(root / f"keras_png_slices_{split}", count, seed)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "slice_blank.png")
    out = tmp_path / "out"
    argv = [*TINY, "--precision", "mixed_bfloat16", "--epochs", "2", "--data", str(root),
            "--out", str(out)]
    import train
    train.main(argv)
    assert strict_json(out / "state.json")["epochs_done"] == 2  # no silent stop
    assert strict_json(out / "config.json")["precision"] == "mixed_bfloat16"
    predict.main(["--checkpoint", str(out), "--out", str(tmp_path / "predict")])
    report = strict_json(tmp_path / "predict" / "report.json")
    assert report["psnr_db"]["max"] <= 100 and 0 < report["ssim"]["mean"] <= 1
    predict.main(["--checkpoint", str(out), "--generate", "4", "--out", str(tmp_path / "gen")])
    generated = strict_json(tmp_path / "gen" / "generation_report.json")
    assert np.isfinite(generated["metrics"]["bits_per_test_code"]["prior"])


@pytest.mark.parametrize("file, damage, argv, message", [
    ("best.keras", b"", [], "best.keras is empty"),
    ("best.keras", b"PK\x03\x04 truncated", [], "best.keras is not a Keras model file"),
    ("prior_best.keras", "best.keras", ["--generate", "2", "--no-metrics"],
     "prior_best.keras holds a VQVAE model, not a PixelCNNPrior"),
    ("config.json", b'{"train": {}}', [], "config.json was written by another version"),
])
def test_predict_names_a_bad_run_file_and_what_is_wrong(trained_run, tmp_path, file, damage,
                                                        argv, message):
    out = copy_run(trained_run, tmp_path / "run")
    (out / file).write_bytes((out / damage).read_bytes() if isinstance(damage, str) else damage)
    (out / "prior_state.json").write_text(json.dumps(
        {**json.loads((out / "prior_state.json").read_text()),
         "vqvae_sha256": predict.file_sha256(out / "best.keras")}))
    with pytest.raises(SystemExit, match=message):
        predict.main(["--checkpoint", str(out), "--out", str(tmp_path / "p"), *argv])


@pytest.mark.parametrize("style_bins", [2, 0])
def test_a_two_level_run_is_read_as_a_train_py_run_is(tmp_path, capsys, style_bins):
    """--checkpoint on a two_level.py --out: the test split it recorded (its validation
    folder) reconstructed, from best.keras or last.keras; samples drawn by its
    TwoLevelGenerator (with the style classes of its training slices, if styled), at the
    two-level default temperatures, or with --top-k in both priors: the very slices the
    generator draws itself, measured with both levels' bits. A run made before run.json says
    how to write it, and its two_level.py command does."""
    import metrics
    import two_level
    import vqvae2
    from conftest import tiny_experiment
    out, argv = tmp_path / "out", tiny_experiment(tmp_path) + [
        "--minutes", "0.001", "0.001", "0.001", "--style-bins", str(style_bins),
        "--generate", "0"]
    two_level.main(argv)
    for weights in ("best", "last"):
        predict.main(["--checkpoint", str(out), "--weights", weights, "--out",
                      str(tmp_path / weights)])
        report = strict_json(tmp_path / weights / "report.json")
        assert report["images"] == 8 and 0 < report["ssim"]["mean"] <= 1
        assert report["codes"] == "bottom level"
        assert report["checkpoint"].endswith(f"{weights}.keras")
    recorded = strict_json(out / "run.json")["style_classes"]
    predict.main(["--checkpoint", str(out), "--generate", "4"])
    generated = strict_json(out / "generate" / "generation_report.json")
    assert generated["temperature"] == {"top": 0.7, "bottom": 1.0}
    assert generated["style_classes"] == style_bins ** 2
    assert generated["code_maps"] == [[4, 4], [8, 8]]
    assert generated["metrics"]["bits_per_test_slice"] > 0
    assert "by level: top" in capsys.readouterr().out
    generator = predict.load_generator(out)[0]
    if style_bins:  # the loaded classes are those of the training slices
        train_images = predict.load_images(dataset.list_images(tmp_path / "train"), 32, 8)
        train_styles = metrics.brain_styles(train_images)
        fitted = vqvae2.StyleClasses(train_styles, style_bins)
        np.testing.assert_allclose(recorded["edges"], fitted.edges)
        np.testing.assert_allclose(recorded["frequencies"], fitted.frequencies)
        np.testing.assert_array_equal(generator.styles(train_styles), fitted(train_styles))
        assert generator.styles.count == 4
    else:
        assert recorded is None and generator.styles is None
    predict.main(["--checkpoint", str(out), "--generate", "4", "--top-k", "3", "--no-metrics",
                  "--out", str(tmp_path / "top3")])
    for folder, top_k in ((out / "generate", 0), (tmp_path / "top3", 3)):
        drawn = generator.decode_all(generator.sampler(4, 1.0, 0, top_k, top_temperature=0.7)())
        saved = np.stack([np.asarray(Image.open(folder / f"sample_{n:03d}.png"))
                          for n in range(4)])
        np.testing.assert_array_equal(saved, (drawn[..., 0] * 255).round().astype(np.uint8))
    (out / "run.json").unlink()
    with pytest.raises(SystemExit, match="run.json not found.*--generate 0"):
        predict.main(["--checkpoint", str(out), "--generate", "4"])
    two_level.main(argv)
    assert strict_json(out / "run.json")["style_classes"] == recorded
    kept = {**strict_json(out / "run.json"), "precision": "mixed_bfloat16"}  # as trained
    (out / "run.json").write_text(json.dumps(kept))
    two_level.main(argv)  # on any machine: the first call's precision stays
    assert strict_json(out / "run.json") == kept


def test_temperature_takes_one_value_or_top_bottom_for_a_two_level_run(trained_run, tmp_path,
                                                                        capsys):
    """One positive value for a train.py run (kept in the report as a number); two, or three,
    are refused, as is one not above 0."""
    predict.main(["--checkpoint", str(trained_run), "--generate", "2", "--no-metrics",
                  "--temperature", "0.9", "--out", str(tmp_path / "one")])
    assert strict_json(tmp_path / "one" / "generation_report.json")["temperature"] == 0.9
    with pytest.raises(SystemExit, match="a train.py run has one prior"):
        predict.main(["--checkpoint", str(trained_run), "--generate", "2", "--no-metrics",
                      "--temperature", "0.7", "1", "--out", str(tmp_path / "two")])
    for bad in (["0.7", "1", "1"], ["0"]):
        with pytest.raises(SystemExit):
            predict.parse_args(["--generate", "2", "--temperature", *bad])
        assert "--temperature takes one or two (TOP BOTTOM) positive numbers" in (
            capsys.readouterr().err)
