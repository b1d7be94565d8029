"""two_level.py: the two-level VQ-VAE, the packing that lets predict.py measure it, and the
experiment end to end on a tiny folder of slices."""

import csv
import json

import keras
import numpy as np
import pytest

import metrics
import two_level
from conftest import write_slices
from prior import PixelCNNPrior


def make_model():
    keras.utils.set_random_seed(0)
    return two_level.TwoLevelVQVAE(image_size=32, width=8, code_dim=4, codebook_size=16,
                                   seed=0)


def test_two_level_codes_have_both_grids_and_decode_to_the_reconstructions(tmp_path):
    """Encoding gives a top map at 1/8 and a bottom map at 1/4 of the image; decoding them
    gives what the model reconstructs; training steps run and the model loads as saved."""
    model = make_model()
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype("float32")
    top, bottom = (codes.numpy() for codes in model.encode(images))
    assert top.shape == (4, 4, 4) and bottom.shape == (4, 8, 8)
    assert 0 <= top.min() and max(top.max(), bottom.max()) < 16
    np.testing.assert_allclose(model.decode_codes(top, bottom).numpy(), model(images).numpy(),
                               atol=1e-5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.fit(images, epochs=8, batch_size=4, verbose=0).history
    assert np.isfinite(logs["loss"]).all() and logs["loss"][-1] < logs["loss"][0]
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, two_level.TwoLevelVQVAE)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)


def test_the_generator_packs_both_levels_and_scores_every_code():
    """Packing and unpacking are inverse; the bits per code are the mean over all codes of
    both levels (the top map's 16 and the bottom map's 64); decode_all decodes packed maps."""
    model = make_model()
    top_prior = PixelCNNPrior(grid_size=4, codebook_size=16, width=8, layers=2, kernel_size=3)
    bottom_prior = PixelCNNPrior(grid_size=8, codebook_size=16, width=8, layers=2,
                                 kernel_size=3, condition_grid=4, condition_codebook=16)
    generator = two_level.TwoLevelGenerator(model, top_prior, bottom_prior)
    rng = np.random.default_rng(1)
    top, bottom = rng.integers(0, 16, (3, 4, 4)), rng.integers(0, 16, (3, 8, 8))
    packed = generator.pack(top, bottom)
    assert packed.shape == (3, 16 + 64)
    for given, back in zip((top, bottom), generator.unpack(packed)):
        np.testing.assert_array_equal(given, back)
    top_bits = float(top_prior.bits_per_code(top))
    bottom_bits = float(bottom_prior.bits_per_code(bottom, top))
    assert np.isclose(generator.bits_per_code(packed), (16 * top_bits + 64 * bottom_bits) / 80)
    assert [level.stop - level.start for level in generator.levels] == [16, 64]
    np.testing.assert_allclose(generator.decode_all(packed),
                               model.decode_codes(top, bottom).numpy(), atol=1e-6)
    drawn = generator.sampler(2, seed=0)()
    assert drawn.shape == (2, 80) and drawn.min() >= 0 and drawn.max() < 16


def tiny_experiment(tmp_path):
    train_dir = write_slices(tmp_path / "train", 16, seed=0, size=32)
    val_dir = write_slices(tmp_path / "validate", 8, seed=1, size=32)
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir),
            "--out", str(tmp_path / "out"), "--image-size", "32", "--width", "8",
            "--code-dim", "4", "--codebook-size", "16", "--batch-size", "8",
            "--top-prior", "8", "2", "3", "--bottom-prior", "8", "2", "3"]


def test_the_experiment_trains_three_stages_and_measures_the_samples(tmp_path):
    """Each stage trains for one epoch (its time limit), the samples are measured like
    predict.py's, and a second call loads the finished stages instead of training again. With
    --schedule constant no stage logs a learning rate: no schedule ran."""
    out = tmp_path / "out"
    argv = tiny_experiment(tmp_path) + ["--minutes", "0.001", "0.001", "0.001",
                                        "--schedule", "constant", "--generate", "4"]
    two_level.main(argv)
    for prefix in ("", "top_prior_", "bottom_prior_"):
        state = json.loads((out / f"{prefix}state.json").read_text())
        assert state["epochs_done"] == 1 and state["finished"]
    report = json.loads((out / "generate" / "generation_report.json").read_text())
    assert report["samples"] == 4 and report["code_maps"] == [[4, 4], [8, 8]]
    levels = report["bits_per_test_code_by_level"]
    assert 0 < levels["top"] < 8 and 0 < levels["bottom"] < 8  # log2 16 = 4 plus an untrained
    assert set(report["metrics"]["frechet_distance"]) >= {"samples", "test_reconstructions"}
    assert len(list((out / "generate").glob("sample_*.png"))) == 4
    logs = {path.name: path.read_text() for path in out.glob("*training_log.csv")}
    assert len(logs) == 3 and not any("learning_rate" in text for text in logs.values())
    two_level.main(argv[:-2] + ["--generate", "0"])
    assert logs == {path.name: path.read_text() for path in out.glob("*training_log.csv")}


def test_a_stage_cut_short_resumes_and_a_changed_model_is_refused(tmp_path):
    """A bottom prior killed after its first epoch was saved (its state not finished, and a
    row logged for an epoch that never was) resumes with a clean log (Keras numbers the logged
    epochs from 0): with its time used up it trains no more; given time, it trains on from its
    saved weights and optimizer; another model size in the same --out, or a first stage
    changed under its priors, is refused."""
    out, argv = tmp_path / "out", tiny_experiment(tmp_path) + ["--generate", "0"]
    minutes = ["--minutes", "0.001", "0.001", "0.001"]
    two_level.main(argv + minutes)
    state_path = out / "bottom_prior_state.json"
    log = out / "bottom_prior_training_log.csv"
    state = json.loads(state_path.read_text())
    del state["finished"]

    def killed(**changes):
        state_path.write_text(json.dumps({**state, **changes}))
        log.write_text(log.read_text() + "1,123.456,0.1,1.0,123.456\n")  # the unsaved epoch's

    killed()  # the first run's time counts: another epoch would pass the limit
    two_level.main(argv + minutes)
    assert json.loads(state_path.read_text())["epochs_done"] == 1
    assert "123.456" not in log.read_text()
    killed(elapsed_minutes=0.0, epoch_seconds=0.0)  # as if that epoch took no time: the
    two_level.main(argv + minutes)  # resumed run trains exactly one more, at any speed
    resumed = json.loads(state_path.read_text())
    assert resumed["epochs_done"] == 2
    assert resumed["optimizer_steps"] == 2 * state["optimizer_steps"]  # not a fresh optimizer
    epochs = [line.split(",")[0] for line in log.read_text().splitlines()[1:]]
    assert epochs == ["0", "1"]
    assert "123.456" not in log.read_text()
    wider = [("16" if flag == "--width" else value) for flag, value in zip([""] + argv, argv)]
    with pytest.raises(SystemExit, match="pass --width 8,"):
        two_level.main(wider)
    make_model().save(out / "best.keras")  # a first stage the priors never saw
    with pytest.raises(SystemExit, match="changed after"):
        two_level.main(argv)


def test_prior_dropout_and_the_schedule_are_built_and_kept(tmp_path, capsys):
    """--prior-dropout TOP BOTTOM sets each prior's training dropout, and --schedule each
    stage's learning rate (cosine: annealed to ~0 by the time limit, logged per epoch); both
    are kept flags, so a later run in the same --out with another value is refused, and a run
    recorded before a flag existed counts as 0 0 and constant."""
    out, argv = tmp_path / "out", tiny_experiment(tmp_path) + ["--generate", "0", "--minutes",
                                                               "0.001", "0.001", "0.001"]
    two_level.main(argv + ["--prior-dropout", "0.25", "0"])
    rates = {prefix: {block.dropout.rate for block in keras.saving.load_model(
        out / f"{prefix}_prior_best.keras").blocks} for prefix in ("top", "bottom")}
    assert rates == {"top": {0.25}, "bottom": {0.0}}
    assert json.loads((out / "args.json").read_text())["prior_dropout"] == [0.25, 0.0]
    # one epoch of 2 batches: the second begins after the first step's tracing, past 0.06 s
    for prefix in ("", "top_prior_", "bottom_prior_"):
        with open(out / f"{prefix}training_log.csv") as log:
            assert [float(row["learning_rate"]) for row in csv.DictReader(log)] == [0.0]
    with pytest.raises(SystemExit, match=r"pass --prior-dropout 0.25 0.0, or"):
        two_level.main(argv + ["--prior-dropout", "0.1", "0"])
    with pytest.raises(SystemExit):
        two_level.parse_args(argv + ["--prior-dropout", "1", "0"])
    assert "--prior-dropout must be at least 0 and below 1" in capsys.readouterr().err
    args = json.loads((out / "args.json").read_text())
    del args["prior_dropout"], args["schedule"]
    (out / "args.json").write_text(json.dumps(args))
    with pytest.raises(SystemExit, match="pass --prior-dropout 0.0 0.0, --schedule constant"):
        two_level.main(argv + ["--prior-dropout", "0.25", "0"])
    # as before the flags: accepted (its stages are loaded)
    two_level.main(argv + ["--schedule", "constant"])


def test_a_finished_stage_trains_on_only_when_given_more_minutes(tmp_path, monkeypatch):
    """A top prior stopped by its time limit trains on from its saved weights and optimizer
    when --minutes gives it more than it used, and only then (a run without --minutes, as to
    sample again, keeps it); a stage that did all its epochs is only loaded; a first stage
    given more time is refused before it trains while priors learned its codes."""
    out, argv = tmp_path / "out", tiny_experiment(tmp_path) + ["--generate", "0"]
    minutes = ["--minutes", "0.001", "0.001", "0.001"]
    two_level.main(argv + minutes)
    state_path = out / "top_prior_state.json"
    state = json.loads(state_path.read_text())
    # as if the limit were far above what the first epoch used: one more epoch at any speed
    state_path.write_text(json.dumps({**state, "elapsed_minutes": 0.0, "epoch_seconds": 0.0}))
    monkeypatch.setattr(two_level, "MINUTES", (0.001,) * 3)  # room too, but not asked for
    two_level.main(argv)
    assert json.loads(state_path.read_text())["epochs_done"] == 1
    two_level.main(argv + minutes)
    resumed = json.loads(state_path.read_text())
    assert resumed["finished"] and resumed["epochs_done"] == 2
    assert resumed["optimizer_steps"] == 2 * state["optimizer_steps"]
    log = (out / "top_prior_training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["0", "1"]
    assert json.loads((out / "bottom_prior_state.json").read_text())["epochs_done"] == 1
    done = {**resumed, "epochs_done": two_level.EPOCHS, "elapsed_minutes": 0.0,
            "epoch_seconds": 0.0}  # time to spare, but no epochs left: not trained on
    state_path.write_text(json.dumps(done))
    two_level.main(argv + minutes)
    assert json.loads(state_path.read_text()) == done
    first_path, best = out / "state.json", (out / "best.keras").read_bytes()
    first = json.loads(first_path.read_text())
    first_path.write_text(json.dumps({**first, "elapsed_minutes": 0.0, "epoch_seconds": 0.0}))
    with pytest.raises(SystemExit, match="learned its codes"):
        two_level.main(argv + minutes)
    assert (out / "best.keras").read_bytes() == best
    assert json.loads(first_path.read_text())["epochs_done"] == first["epochs_done"]


def test_style_classes():
    """StyleClasses: quantile bins of the training styles, so each bin of brightness (and of
    contrast) holds a quarter of the training slices, brighter slices land in higher
    brightness bins, and draws follow the training frequencies."""
    rng = np.random.default_rng(0)
    train_styles = rng.uniform(0, 1, (400, 2))
    classes = two_level.StyleClasses(train_styles, 4)
    train_classes = classes(train_styles)
    assert classes.count == 16 and train_classes.min() >= 0 and train_classes.max() < 16
    np.testing.assert_array_equal(np.bincount(train_classes // 4), [100] * 4)  # brightness
    np.testing.assert_array_equal(np.bincount(train_classes % 4), [100] * 4)  # contrast
    assert list(classes(np.array([[0.01, 0.99], [0.99, 0.01]]))) == [3, 12]
    three = two_level.StyleClasses(rng.uniform(0, 1, (400, 3)), 2)  # base-2 digits, 8 classes
    assert three.count == 8 and list(three(np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]]))) == [5, 2]
    tied = np.repeat(rng.uniform(0, 1, (400, 1)), 2, axis=1)  # contrast rises with brightness
    drawn = two_level.StyleClasses(tied, 4).draw(4000, np.random.default_rng(1))
    assert set(drawn) == {0, 5, 10, 15}  # the only classes training has: the diagonal
    assert all(abs(np.mean(drawn == c) - 0.25) < 0.03 for c in (0, 5, 10, 15))


def test_a_styled_generator_packs_the_style_and_conditions_the_top_prior_on_it():
    """With StyleClasses the style is packed last, outside both levels (so shuffling codes
    keeps it), the top map's bits depend on it, samples carry drawn styles, and a top prior
    and StyleClasses come together or not at all."""
    model = make_model()
    top_prior = PixelCNNPrior(grid_size=4, codebook_size=16, width=8, layers=2, kernel_size=3,
                              condition_grid=1, condition_codebook=4)
    bottom_prior = PixelCNNPrior(grid_size=8, codebook_size=16, width=8, layers=2,
                                 kernel_size=3, condition_grid=4, condition_codebook=16)
    classes = two_level.StyleClasses(np.random.default_rng(0).uniform(0, 1, (40, 2)), 2)
    generator = two_level.TwoLevelGenerator(model, top_prior, bottom_prior, classes)
    rng = np.random.default_rng(1)
    top, bottom = rng.integers(0, 16, (3, 4, 4)), rng.integers(0, 16, (3, 8, 8))
    packed = generator.pack(top, bottom, np.array([0, 1, 3]))
    assert packed.shape == (3, 16 + 64 + 1) and list(packed[:, -1]) == [0, 1, 3]
    for given, back in zip((top, bottom, [[[0]], [[1]], [[3]]]), generator.unpack(packed)):
        np.testing.assert_array_equal(given, back)
    shuffled = metrics.shuffle_codes(packed, np.random.default_rng(2), generator.levels)
    np.testing.assert_array_equal(shuffled[:, -1], packed[:, -1])
    restyled = generator.pack(top, bottom, np.array([2, 2, 2]))
    assert generator.level_bits(packed)[0] != generator.level_bits(restyled)[0]
    assert generator.level_bits(packed)[1] == generator.level_bits(restyled)[1]
    drawn = generator.sampler(5, seed=0)()
    assert drawn.shape == (5, 81) and set(drawn[:, -1]) <= set(range(4))
    images = model.decode_all(top, bottom)
    encoded = generator.encode_all([images[:2], images[2:]])
    np.testing.assert_array_equal(encoded[:, -1], classes(metrics.brain_styles(images)))
    with pytest.raises(ValueError, match="StyleClasses"):
        two_level.TwoLevelGenerator(model, top_prior, bottom_prior)
    unstyled = PixelCNNPrior(grid_size=4, codebook_size=16, width=8, layers=2, kernel_size=3)
    with pytest.raises(ValueError, match="StyleClasses"):
        two_level.TwoLevelGenerator(model, unstyled, bottom_prior, classes)


def test_style_bins_train_a_styled_top_prior_and_are_kept(tmp_path, capsys):
    """--style-bins 2: the top prior is conditioned on 4 style classes (a 1x1 map), the
    samples are measured, the flag is kept (a later run with another value is refused, a run
    recorded before the flag counts as 0), and a negative value is an error."""
    out = tmp_path / "out"
    argv = tiny_experiment(tmp_path) + ["--minutes", "0.001", "0.001", "0.001"]
    two_level.main(argv + ["--style-bins", "2", "--generate", "4"])
    top_prior = keras.saving.load_model(out / "top_prior_best.keras")
    assert top_prior.hparams["condition_grid"] == 1
    assert top_prior.hparams["condition_codebook"] == 4
    report = json.loads((out / "generate" / "generation_report.json").read_text())
    assert report["samples"] == 4 and 0 < report["bits_per_test_code_by_level"]["top"] < 8
    with pytest.raises(SystemExit, match="pass --style-bins 2,"):
        two_level.main(argv + ["--generate", "0"])
    args = json.loads((out / "args.json").read_text())
    del args["style_bins"]
    (out / "args.json").write_text(json.dumps(args))
    with pytest.raises(SystemExit, match="pass --style-bins 0,"):
        two_level.main(argv + ["--style-bins", "2", "--generate", "0"])
    with pytest.raises(SystemExit):
        two_level.parse_args(argv + ["--style-bins", "-1"])
    assert "--style-bins must be 0 (none) or more" in capsys.readouterr().err
