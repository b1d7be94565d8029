import csv
import json
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
import monitor
import train
from conftest import TINY


def read_log(out):
    with open(out / "training_log.csv") as f:
        return list(csv.DictReader(f))


def test_two_epochs_leave_every_output(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"best.keras", "last.keras", "config.json", "state.json", "training_log.csv",
            "progress.gif", "loss_curves_linear.png", "loss_curves_log.png", "ssim_curve.png",
            "tensorboard", "frames", "train_summary.json"} <= names
    assert not any(name.startswith("tmp-") for name in names)  # atomic writes left no temp file
    rows = read_log(trained_run)
    assert len(rows) == 2
    for key in ("loss", "reconstruction_loss", "vq_loss", "perplexity", "codebook_usage",
                "val_ssim", "val_psnr", "epoch_seconds"):
        assert np.isfinite(float(rows[-1][key])), key
    gif = Image.open(trained_run / "progress.gif")
    assert gif.n_frames == 2
    config = json.loads((trained_run / "config.json").read_text())
    assert config["train"]["image_size"] == 32 and config["splits"]["test"].endswith("test")
    assert json.loads((trained_run / "state.json").read_text())["epochs_done"] == 2


def copy_run(run, out):
    """A copy of a run folder (without tensorboard/), to change while the shared one stays."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("tensorboard"))
    return out


def test_resume_continues_with_optimizer_and_codebook_state(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    before = keras.models.load_model(out / "last.keras")
    steps_per_epoch = before.optimizer.iterations.numpy() // 2
    train.main(["--resume", "--epochs", "3", "--out", str(out)])
    after = keras.models.load_model(out / "last.keras")
    # 3 epochs of steps: the optimizer (and with it the weights, saved in the same file) came
    # from last.keras; a fresh model would count only the one resumed epoch
    assert after.optimizer.iterations.numpy() == 3 * steps_per_epoch
    assert not np.allclose(after.quantizer.codebook.numpy(), before.quantizer.codebook.numpy())
    assert [row["epoch"] for row in read_log(out)] == ["0", "1", "2"]
    assert Image.open(out / "progress.gif").n_frames == 3


def test_time_limit_stops_after_the_first_epoch(oasis_root, tmp_path):
    train.main(["--data", str(oasis_root), "--epochs", "5", "--time-limit", "0.0001",
                "--out", str(tmp_path), *TINY])
    assert len(read_log(tmp_path)) == 1


def test_no_data_flags_build_and_use_the_demo_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 4, "validate": 2, "test": 2})
    config = train.Config()
    splits = train.resolve_splits(config)
    assert "DEMO" in capsys.readouterr().out
    assert config.time_limit == train.DEMO_MINUTES  # the first run ends within 10 minutes
    assert config.prior_time_limit == train.DEMO_PRIOR_MINUTES
    assert config.downsample == 8  # 32x32 codes, so the demo's prior learns in minutes
    given = train.parse_args(["--downsample", "4", "--prior-time-limit", "0"])
    train.resolve_splits(given[0], given[1].given)
    assert given[0].downsample == 4 and given[0].prior_time_limit == 0
    assert splits["train"].endswith("data/demo/keras_png_slices_train")
    assert len(dataset.list_images(splits["test"])) == 2
    assert (tmp_path / "data" / "demo" / "complete").exists()


@pytest.mark.parametrize("argv, message", [
    (["--train-dir", "somewhere"], "--train-dir and --val-dir go together"),
    (["--data", "no/such/folder"], "no/such/folder does not exist"),
    (["--train-dir", "no/train", "--val-dir", "no/val"], "no/train does not exist"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--out", str(tmp_path / "out"), *TINY])
    assert message in str(exit_.value)


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "30"], "--downsample must be 2, 4, 8 or 16 and divide --image-size"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--width", "4"], "--width must be at least 8"),
    (["--ema-decay", "1.5"], "--ema-decay must be between 0 and 1"),
    (["--resume", "--learning-rate", "0.1"], "only --epochs, --time-limit, --out, --prior-epochs"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--beta", "-1"], "--beta must be a number >= 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
    (["--out", __file__], "is, or is inside, a file, not a folder"),
])
def test_impossible_settings_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resume_without_a_saved_run_says_so(tmp_path):
    with pytest.raises(SystemExit, match="--resume needs .*config.json"):
        train.main(["--resume", "--out", str(tmp_path)])


def test_resume_takes_saved_settings_and_any_given_epochs_or_time_limit(trained_run):
    config, resume = train.parse_args(["--resume", "--out", str(trained_run), "--epochs", "20",
                                       "--time-limit", "0"])
    assert resume and config.image_size == 32 and config.codebook_size == 16
    assert config.epochs == 20 and config.time_limit == 0  # defaults, still taken when given
    assert config.out == str(trained_run)


def test_a_new_seed_rebuilds_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    first = train.resolve_splits(train.Config(seed=0))["train"]
    image = (tmp_path / first / "demo_0000.png").read_bytes()
    train.resolve_splits(train.Config(seed=1))
    assert (tmp_path / first / "demo_0000.png").read_bytes() != image
    assert (tmp_path / "data" / "demo" / "complete").read_text() == "seed 1\n"


def test_resume_needs_more_epochs_than_done(trained_run):
    with pytest.raises(SystemExit, match="has done 2 epochs already: pass --epochs larger"):
        train.main(["--resume", "--epochs", "2", "--out", str(trained_run)])


def test_a_new_run_never_overwrites_an_old_one(oasis_root, trained_run):
    before = (trained_run / "last.keras").read_bytes()
    with pytest.raises(SystemExit, match="already holds a training run: continue it with"):
        train.main(["--data", str(oasis_root), "--out", str(trained_run), *TINY])
    assert (trained_run / "last.keras").read_bytes() == before


def test_an_explicit_time_limit_of_zero_lifts_the_demo_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    config = train.parse_args(["--time-limit", "0"])[0]
    train.resolve_splits(config)
    assert config.time_limit == 0


def test_the_prior_trains_after_the_vqvae_and_leaves_its_outputs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"prior_best.keras", "prior_last.keras", "prior_state.json", "prior_summary.json",
            "prior_training_log.csv", "prior_bits_curve.png"} <= names
    assert (trained_run / "tensorboard" / "prior" / "train").is_dir()
    with open(trained_run / "prior_training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:  # bits per code: above 0, near log2(16) = 4 for a prior this small
        assert 0 < float(row["bits_per_code"]) < 6 and 0 < float(row["val_bits_per_code"]) < 6
    state = json.loads((trained_run / "prior_state.json").read_text())
    assert state["epochs_done"] == 2
    assert state["vqvae_sha256"] == monitor.file_sha256(trained_run / "best.keras")
    summary = json.loads((trained_run / "prior_summary.json").read_text())
    baselines = summary["baselines_bits_per_code"]
    assert baselines["uniform"] == 4.0 and 0 < baselines["per-position unigram"] < 8
    prior = json.loads((trained_run / "config.json").read_text())["prior"]
    assert prior["grid_size"] == 8 and prior["codebook_size"] == 16 and prior["layers"] == 2


def test_resume_of_a_finished_vqvae_continues_its_prior(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    vqvae = (out / "last.keras").read_bytes()
    train.main(["--resume", "--prior-epochs", "3", "--out", str(out)])
    assert (out / "last.keras").read_bytes() == vqvae  # stage one was not touched
    prior = keras.models.load_model(out / "prior_last.keras")
    assert prior.optimizer.iterations.numpy() == 3  # 24 maps in one batch: a step per epoch
    with open(out / "prior_training_log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    with pytest.raises(SystemExit, match="pass --prior-epochs larger"):
        train.main(["--resume", "--out", str(out)])


def test_prior_only_adds_a_prior_to_a_vqvae_run(oasis_root, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--data", str(oasis_root), "--epochs", "1", "--out", str(out), *TINY,
                "--prior-epochs", "0"])
    assert not (out / "prior_state.json").exists()
    # saved with --prior-epochs 0; a plain --prior-only takes the default instead
    assert train.parse_args(["--prior-only", "--out", str(out)])[0].prior_epochs == 20
    train.main(["--prior-only", "--prior-epochs", "1", "--prior-width", "4", "--out", str(out)])
    assert json.loads((out / "prior_state.json").read_text())["epochs_done"] == 1
    assert json.loads((out / "config.json").read_text())["prior"]["width"] == 4
    for argv, message in [([], "holds a prior already: continue it with --resume"),
                          (["--width", "16"], "only --prior-epochs, .* may be given, not --width"),
                          (["--resume"], "--resume and --prior-only do not go together")]:
        with pytest.raises(SystemExit):
            train.main(["--prior-only", *argv, "--out", str(out)])
        assert re.search(message, capsys.readouterr().err), message


def change_best_vqvae(out):
    """Really change the VQ-VAE under a run's prior: move one code of best.keras."""
    model = keras.models.load_model(out / "best.keras")
    model.quantizer.codebook.assign(model.quantizer.codebook + 0.5)
    model.save(out / "best.keras")


def test_a_prior_refuses_a_vqvae_that_changed_under_it(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    change_best_vqvae(out)
    with pytest.raises(SystemExit, match="changed after the prior"):
        train.main(["--resume", "--prior-epochs", "5", "--out", str(out)])


def test_a_nan_in_validation_alone_stops_the_run_with_an_error(tmp_path):
    """Training stays finite, validation does not: fit() must not end as if all went well."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    batches = lambda x: tf.data.Dataset.from_tensor_slices((x, np.ones((4, 1)))).batch(4)  # noqa
    data, broken = batches(np.ones((4, 2))), batches(np.full((4, 2), np.nan))
    callbacks = [monitor.Checkpoints(tmp_path, {}, monitor="val_loss", higher_is_better=False)]
    with pytest.raises(SystemExit, match="val_loss became NaN or infinite"):
        train.fit(model, data, broken, 3, {}, callbacks, "loss", "--learning-rate")
    assert not (tmp_path / "state.json").exists()  # the broken epoch was not recorded


def test_damaged_run_files_are_named_not_crashed_on(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    (out / "prior_last.keras").write_bytes(b"not a keras file")
    with pytest.raises(SystemExit, match="could not load .*prior_last.keras"):
        train.main(["--resume", "--prior-epochs", "5", "--out", str(out)])
    (out / "state.json").write_text("{broken")
    with pytest.raises(SystemExit, match="could not read .*state.json"):
        train.main(["--resume", "--out", str(out)])


def test_an_out_folder_inside_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "file" / "run")])
    assert "is, or is inside, a file" in capsys.readouterr().err
