import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
import modules
import monitor
import train
from conftest import TINY, write_slices
from settings import Config, purpose_config


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
    config = Config()
    splits = train.resolve_splits(config, "mixed_bfloat16")
    printed = capsys.readouterr().out
    assert "DEMO" in printed and ("--purpose generate --image-size 256 --downsample 8 --width 64 "
                                  "--res-blocks 1 --prior-width 32") in printed
    assert "float32" not in printed
    assert config.time_limit == 5 and config.prior_time_limit == 4  # 10 minutes with bfloat16
    assert "the VQ-VAE trains 20 epochs or about 5 minutes, whichever ends first" in printed
    assert (config.image_size, config.downsample) == (256, 8)  # 32x32 codes: a prior in minutes
    assert (config.width, config.res_blocks) == (64, 1)  # a first stage sized for 5 minutes
    assert (config.prior_width, config.prior_layers) == (32, 12)  # the prior measured so
    given = train.parse_args(["--downsample", "4", "--prior-time-limit", "0",
                              "--prior-width", "16"])
    train.resolve_splits(given[0], "mixed_bfloat16", given[1].given)
    assert given[0].downsample == 4 and given[0].prior_time_limit == 0  # the user's flags win
    assert given[0].prior_width == 16 and given[0].width == 64  # the demo sizes the rest
    sharp = train.parse_args(["--purpose", "reconstruct"])[0]
    train.resolve_splits(sharp, "mixed_bfloat16", {"purpose"})  # it sizes only the generator
    assert (sharp.downsample, sharp.width, sharp.prior_width, sharp.prior_layers) == (
        4, 64, 64, 8)
    assert splits["train"].endswith("data/demo/keras_png_slices_train")
    assert len(dataset.list_images(splits["test"])) == 2
    assert (tmp_path / "data" / "demo" / "complete").exists()


def test_a_float32_demo_trains_smaller_images_for_a_set_number_of_epochs(tmp_path, monkeypatch,
                                                                       capsys):
    """Without bfloat16 a step is ~5x slower: the demo trains 128-px slices into 16x16 codes of
    8x8 pixels, for a set number of epochs (the same training on any CPU). Those epochs were
    measured for that model only: with another purpose or a grid given, the minute caps hold."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    config = Config()
    train.resolve_splits(config, "float32")
    printed = capsys.readouterr().out
    assert "float32 here" in printed and ("--purpose generate --image-size 128 --downsample 8 "
                                          "--width 64 --res-blocks 1 --prior-width 32 "
                                          "--prior-layers 12;" in printed)
    assert "the VQ-VAE trains 12 epochs; the prior 12 epochs (" in printed
    assert "with --image-size or --downsample given: the 5 and 4 minute caps instead" in printed
    assert train.FLOAT32_RECIPE not in printed  # the demo sizes itself instead
    assert (config.image_size, config.downsample, config.width, config.res_blocks) == (
        128, 8, 64, 1)
    assert (config.prior_width, config.prior_layers) == (32, 12)  # reaching all 16 rows
    assert (config.epochs, config.prior_epochs) == (12, 12)
    assert config.time_limit is None and config.prior_time_limit is None
    with monkeypatch.context() as patch:  # a float32 grid unlike either default: a leak shows
        patch.setitem(train.DEMO_FLOAT32, "model",
                      {**train.DEMO_FLOAT32["model"], "image_size": 96, "downsample": 4})
        for argv, grid in ((["--image-size", "64"], (64, 8)), (["--downsample", "16"], (256, 16))):
            given = train.parse_args([*argv, "--prior-layers", "10", "--epochs", "9"])
            train.resolve_splits(given[0], "float32", given[1].given)  # the grid goes as a pair
            assert (given[0].image_size, given[0].downsample) == grid
            assert given[0].prior_layers == 10 and given[0].width == 64
            assert (given[0].epochs, given[0].prior_epochs) == (9, 20)
            assert (given[0].time_limit, given[0].prior_time_limit) == (5, 4)
            printed = capsys.readouterr().out
            assert "float32 here" not in printed and "or about 5 minutes" in printed
    sharp = train.parse_args(["--purpose", "reconstruct"])[0]
    train.resolve_splits(sharp, "float32", {"purpose"})
    assert (sharp.image_size, sharp.downsample, sharp.epochs, sharp.time_limit) == (
        256, 4, 20, 5)
    assert "float32 here" not in capsys.readouterr().out
    quiet = train.parse_args(["--prior-epochs", "0"])
    train.resolve_splits(quiet[0], "float32", quiet[1].given)
    assert "the VQ-VAE trains 12 epochs; no prior (--prior-epochs 0)" in capsys.readouterr().out


def test_real_data_on_a_cpu_without_bfloat16_gets_the_float32_recipe(oasis_root, tmp_path,
                                                                      monkeypatch, capsys):
    """On real data the grid stays the user's (a run keeps its slice size): where auto precision
    found no bfloat16 on a CPU, the run only says that the 256-px model trains ~5x slower and
    gives the recipe the README measured, the same one the README's command shows."""
    gpus = []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: gpus if kind == "GPU" else [])
    for split in ("train", "validate"):
        (tmp_path / split).mkdir()
    real = ["--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "validate")]
    for argv in (real, ["--data", str(oasis_root)]):
        config, mode = train.parse_args(argv)
        train.resolve_splits(config, "float32", mode.given)
        printed = capsys.readouterr().out
        assert "no bfloat16 on this CPU" in printed and "the default 256-px model" in printed
        assert printed.rstrip().endswith(train.FLOAT32_RECIPE)
        assert (config.image_size, config.downsample, config.epochs) == (256, 8, Config.epochs)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text()
                      .replace("\\\n", " ").split())
    commands = re.findall(r"brain-slices/validate (--image-size 128 [^`]*?) --out OUT", readme)
    assert train.FLOAT32_RECIPE in commands  # one README command's flags, exactly
    cases = [("mixed_bfloat16", []), ("float32", ["--downsample", "4"]),
             ("float32", ["--image-size", "128"]), ("float32", ["--precision", "float32"]),
             ("float32", ["--purpose", "reconstruct"])]
    for precision, argv in cases:
        config, mode = train.parse_args([*real, *argv])
        train.resolve_splits(config, precision, mode.given)
        assert "bfloat16" not in capsys.readouterr().out, (precision, argv)
    gpus.append(tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"))  # an old GPU
    config, mode = train.parse_args(real)
    train.resolve_splits(config, "float32", mode.given)
    assert "bfloat16" not in capsys.readouterr().out


def test_train_sizes_the_demo_for_the_precision_it_chose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    trained = {}
    monkeypatch.setattr(train, "train_vqvae", lambda config, *rest: trained.update(
        vqvae=dataclasses.replace(config)))
    monkeypatch.setattr(train, "train_prior", lambda config, *rest, **kw: True)
    monkeypatch.setattr(train, "choose_precision", lambda choice: "float32")
    train.main(["--out", "run"])
    assert (trained["vqvae"].image_size, trained["vqvae"].epochs) == (128, 12)
    monkeypatch.setattr(train, "choose_precision", lambda choice: "mixed_bfloat16")
    try:
        train.main(["--out", "run2"])
    finally:
        keras.mixed_precision.set_global_policy("float32")  # train() set it for the process
    assert (trained["vqvae"].image_size, trained["vqvae"].time_limit) == (256, 5)


@pytest.mark.parametrize("argv, message", [
    (["--train-dir", "somewhere"], "--train-dir and --val-dir go together"),
    (["--data", "no/such/folder"], "no/such/folder does not exist"),
    (["--train-dir", "no/train", "--val-dir", "no/val"], "no/train does not exist"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([*argv, "--out", str(tmp_path / "out"), *TINY])
    assert message in str(exit_.value)


def test_a_new_seed_rebuilds_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    first = train.resolve_splits(Config(seed=0), "float32")["train"]
    image = (tmp_path / first / "demo_0000.png").read_bytes()
    train.resolve_splits(Config(seed=1), "float32")
    assert (tmp_path / first / "demo_0000.png").read_bytes() != image
    assert (tmp_path / "data" / "demo" / "complete").read_text() == "seed 1\n"


def test_resume_needs_more_epochs_than_done(trained_run):
    with pytest.raises(SystemExit, match="has done 2 epochs already: pass --epochs larger"):
        train.main(["--resume", "--epochs", "1", "--out", str(trained_run)])


def test_a_new_run_never_overwrites_an_old_one(oasis_root, trained_run):
    before = (trained_run / "last.keras").read_bytes()
    with pytest.raises(SystemExit, match="already holds a training run: continue it with"):
        train.main(["--data", str(oasis_root), "--out", str(trained_run), *TINY])
    assert (trained_run / "last.keras").read_bytes() == before


def test_an_explicit_time_limit_of_zero_lifts_the_demo_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "DEMO_COUNTS", {"train": 2, "validate": 1, "test": 1})
    config, mode = train.parse_args(["--time-limit", "0"])
    train.resolve_splits(config, "mixed_bfloat16", mode.given)
    assert config.time_limit == 0 and config.prior_time_limit == train.DEMO["caps"][
        "prior_time_limit"]


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


def test_with_no_model_flags_both_stages_train_the_generating_model(oasis_root, tmp_path):
    no_model_flags = [word for flag, value in zip(TINY[::2], TINY[1::2])
                      if flag not in ("--purpose", "--width") for word in (flag, value)]
    train.main(["--data", str(oasis_root), "--epochs", "1", "--prior-epochs", "1",
                "--out", str(tmp_path), *no_model_flags])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["purpose"] == "generate"
    assert (saved["model"]["downsample"], saved["model"]["width"],
            saved["model"]["res_blocks"]) == (8, 128, 2)
    assert saved["prior"]["grid_size"] == 4  # 32 px / 8
    assert (tmp_path / "prior_best.keras").exists()


def test_resume_of_a_finished_vqvae_continues_its_prior(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    vqvae = (out / "last.keras").read_bytes()
    train.main(["--resume", "--prior-epochs", "3", "--out", str(out)])
    assert (out / "last.keras").read_bytes() == vqvae  # stage one was not touched
    prior = keras.models.load_model(out / "prior_last.keras")
    assert prior.optimizer.iterations.numpy() == 3 * 3  # 24 maps in batches of 8, 3 epochs
    with open(out / "prior_training_log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    with pytest.raises(SystemExit, match="nothing to do: .* and so is its prior"):
        train.main(["--resume", "--out", str(out)])


def test_prior_only_adds_a_prior_to_a_vqvae_run(oasis_root, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--data", str(oasis_root), "--epochs", "1", "--out", str(out), *TINY,
                "--prior-epochs", "0"])
    assert not (out / "prior_state.json").exists()
    # saved with --prior-epochs 0; a plain --prior-only takes the default instead
    assert train.parse_args(["--prior-only", "--out", str(out)])[0].prior_epochs == 20
    train.main(["--prior-only", "--prior-epochs", "1", "--prior-width", "4", "--prior-dropout",
                "0.3", "--out", str(out)])
    assert json.loads((out / "prior_state.json").read_text())["epochs_done"] == 1
    prior = json.loads((out / "config.json").read_text())["prior"]
    assert (prior["width"], prior["dropout"]) == (4, 0.3)
    for argv, message in [([], "holds a prior already: continue it with --resume"),
                          (["--width", "16"], "contradict them: --width 16 .the run has 8."),
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
    with pytest.raises(SystemExit, match="prior_last.keras is not a Keras model file"):
        train.main(["--resume", "--prior-epochs", "5", "--out", str(out)])
    (out / "state.json").write_text("{broken")
    with pytest.raises(SystemExit, match="could not read .*state.json"):
        train.main(["--resume", "--out", str(out)])


def split_root(tmp_path, counts):
    """An OASIS-layout root with `counts` {split: slices} of fake slices."""
    root = tmp_path / "keras_png_slices_data"
    for seed, (split, count) in enumerate(counts.items()):
        write_slices(root / f"keras_png_slices_{split}", count, seed)
    return root


def test_skip_bad_files_leaves_them_out_lists_them_and_trains(tmp_path, capsys):
    root = split_root(tmp_path, {"train": 10, "validate": 4})
    train_dir = root / "keras_png_slices_train"
    (train_dir / "empty.png").write_bytes(b"")
    (train_dir / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="empty.png is empty.*--skip-bad-files"):
        train.main(["--data", str(root), "--epochs", "1", "--out", str(tmp_path / "a"), *TINY,
                    "--prior-epochs", "0"])
    train.main(["--data", str(root), "--epochs", "1", "--out", str(tmp_path / "b"), *TINY,
                "--prior-epochs", "1", "--skip-bad-files"])
    assert "left out 2 bad file(s)" in capsys.readouterr().out
    skipped = json.loads((tmp_path / "b" / "config.json").read_text())["skipped_files"]
    assert [Path(entry.split(" (")[0]).name for entry in skipped] == ["empty.png", "notes.png"]
    assert json.loads((tmp_path / "b" / "prior_state.json").read_text())["epochs_done"] == 1


def test_a_split_of_a_single_slice_trains(tmp_path):
    root = split_root(tmp_path, {"train": 1, "validate": 1})
    train.main(["--data", str(root), "--epochs", "2", "--out", str(tmp_path / "out"), *TINY])
    assert len(read_log(tmp_path / "out")) == 2


def test_blank_training_slices_get_a_message_about_the_data(tmp_path):
    root = split_root(tmp_path, {"validate": 2})
    blank = root / "keras_png_slices_train"
    blank.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(blank / f"black_{i}.png")
    with pytest.raises(SystemExit, match="keras_png_slices_train are blank: every pixel has the "
                                         "same value"):
        train.main(["--data", str(root), "--out", str(tmp_path / "out"), *TINY])
    with pytest.raises(ValueError, match="data_variance must be positive"):
        modules.VQVAE(image_size=16, width=8, code_dim=4, codebook_size=8, data_variance=0.0)


def test_resume_after_a_kill_before_the_first_epoch_starts_afresh(trained_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_bytes((trained_run / "config.json").read_bytes())
    train.main(["--resume", "--out", str(out), "--prior-epochs", "0"])
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 2


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b""), "best.keras is empty"),
    (lambda path: path.write_bytes(path.read_bytes()[:2000]), "best.keras is not a Keras "
                                                               "model file"),
    (lambda path: path.write_text("hello"), "best.keras is not a Keras model file"),
    (lambda path: zip_of_text(path), r"best.keras could not be loaded"),
    (lambda path: foreign_model().save(path), "best.keras holds a Sequential model, not a VQVAE"),
    (lambda path: path.write_bytes(path.with_name("prior_best.keras").read_bytes()),
     "best.keras holds a PixelCNNPrior model, not a VQVAE"),
    (lambda path: lambda_model().save(path), "best.keras holds code .a Lambda layer."),
])
def test_bad_checkpoints_are_named_with_what_is_wrong(trained_run, tmp_path, damage, message):
    out = copy_run(trained_run, tmp_path / "out")
    (out / "prior_state.json").unlink()
    damage(out / "best.keras")
    with pytest.raises(SystemExit, match=message):
        train.main(["--prior-only", "--out", str(out)])


def zip_of_text(path):
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a Keras model")


def foreign_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def lambda_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)])


def test_resume_with_a_used_up_time_limit_continues_the_prior_not_the_vqvae(oasis_root,
                                                                            tmp_path):
    """What a scheduler script does: rerun the same --resume --time-limit command."""
    out = tmp_path / "out"
    train.main(["--data", str(oasis_root), "--epochs", "5", "--time-limit", "0.0001",
                "--out", str(out), *TINY, "--prior-epochs", "1"])
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 1
    train.main(["--resume", "--time-limit", "0.0001", "--prior-epochs", "2", "--out", str(out)])
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 1  # time is up
    prior = keras.models.load_model(out / "prior_last.keras")
    assert prior.optimizer.iterations.numpy() == 2 * 3  # on from its epoch 1: 3 steps each
    with open(out / "prior_training_log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]


def test_prior_only_accepts_a_best_keras_saved_again_when_there_is_no_prior(oasis_root,
                                                                           tmp_path):
    out = tmp_path / "out"
    train.main(["--data", str(oasis_root), "--epochs", "1", "--out", str(out), *TINY,
                "--prior-epochs", "0"])
    change_best_vqvae(out)  # e.g. restored from a backup: no prior depends on it yet
    train.main(["--prior-only", "--prior-epochs", "1", "--out", str(out)])
    assert json.loads((out / "prior_state.json").read_text())["vqvae_sha256"] == \
        monitor.file_sha256(out / "best.keras")


# --- precision and XLA --------------------------------------------------------------------------


@pytest.mark.parametrize("capability, policy", [((9, 0), "mixed_bfloat16"),
                                                ((8, 0), "mixed_bfloat16"),
                                                ((7, 5), "mixed_float16"),
                                                ((6, 1), "float32")])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, capability,
                                                                policy):
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    assert train.choose_precision("auto") == policy
    assert train.choose_precision("float32") == "float32"  # an explicit choice stands


def one_sgd_update(model, data):
    """Mean |change| of the first trainable kernel in the first step that the optimizer applies,
    with plain SGD (the update is proportional to the gradient). Under loss scaling a step whose
    scaled gradients overflow float16 is skipped (and the scale halved): the loop waits for the
    first applied one."""
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False)
    kernel = model.trainable_variables[0]
    before = kernel.numpy().copy()
    for _ in range(10):
        model.fit(data, batch_size=len(data), epochs=1, verbose=0)
        if int(model.optimizer.iterations) == 1:
            return np.abs(kernel.numpy() - before).mean()
    raise AssertionError("no step was applied in 10")


def test_mixed_float16_scales_the_loss_and_keeps_codes_and_logits_float32():
    """Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer, which unscales
    the gradients: the train steps must scale the loss first, or the gradients would come out
    2**15 times too small."""
    config = purpose_config("reconstruct", image_size=16, width=8, code_dim=4, codebook_size=8,
                            prior_width=8, prior_layers=2, prior_kernel=3)
    images = np.random.default_rng(3).random((8, 16, 16, 1)).astype("float32")
    codes = np.random.default_rng(4).integers(0, 8, (8, 4, 4)).astype("int32")
    updates = {}
    for policy in ("float32", "mixed_float16"):
        keras.utils.set_random_seed(0)
        keras.mixed_precision.set_global_policy(policy)
        vqvae, prior = train.build_model(config, 0.1), train.build_prior(config, 4, 8)
        for model, data in ((vqvae, images), (prior, codes)):
            scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            assert scaled == (policy == "mixed_float16")
            history = model.fit(data, batch_size=4, epochs=2, verbose=0).history
            assert all(np.all(np.isfinite(values)) for values in history.values())
        quantizer = vqvae.quantizer
        assert {v.dtype for v in (quantizer.codebook, quantizer.ema_sum, quantizer.ema_count)} \
            == {"float32"}
        assert quantizer.compute_dtype == "float32"
        assert vqvae.encoder(images).dtype == "float32" and vqvae(images).dtype == "float32"
        assert prior(codes).dtype == "float32"
        keras.utils.set_random_seed(0)
        vqvae, prior = train.build_model(config, 0.1), train.build_prior(config, 4, 8)
        updates[policy] = one_sgd_update(vqvae, images), one_sgd_update(prior, codes)
    assert vqvae.encoder.steps[0].compute_dtype == "float16"  # the policy did apply
    for mixed, full in zip(updates["mixed_float16"], updates["float32"]):
        assert 0.5 * full < mixed < 2 * full


def test_decoder_output_builds_the_decoder_it_names():
    config = purpose_config("reconstruct", image_size=16, width=8, code_dim=4, codebook_size=8)
    assert train.build_model(config, 0.1).decoder.subpixel is True
    transposed = dataclasses.replace(config, decoder_output="transposed")
    assert train.build_model(transposed, 0.1).decoder.subpixel is False


def test_jit_compile_on_trains_with_xla():
    config = purpose_config("reconstruct", image_size=16, width=8, code_dim=4, codebook_size=8,
                            jit_compile="on")
    model = train.build_model(config, 0.1)
    assert model.jit_compile is True
    assert train.build_model(dataclasses.replace(config, jit_compile="auto"), 0.1).jit_compile \
        is False
    images = np.random.default_rng(5).random((8, 16, 16, 1)).astype("float32")
    history = model.fit(images, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
