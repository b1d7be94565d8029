"""two_level.py: the experiment end to end on a tiny folder of slices: three stages trained,
resumed and refused as their flags say, and the samples measured."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

import monitor
import two_level
import vqvae2
from conftest import tiny_experiment, write_slices
from vqvae2 import TwoLevelVQVAE


def test_the_experiment_trains_three_stages_and_measures_the_samples(tmp_path, monkeypatch):
    """Each stage trains for one epoch (its time limit), the samples are drawn and measured by
    predict.py --generate (at the default temperatures: the bottom prior's, then the top's), and
    a second call loads the finished stages instead of training again. With --schedule
    constant no stage logs a learning rate: no schedule ran."""
    out = tmp_path / "out"
    argv = tiny_experiment(tmp_path) + ["--minutes", "0.001", "0.001", "0.001",
                                        "--schedule", "constant", "--generate", "4"]
    calls, sampler = [], vqvae2.TwoLevelGenerator.sampler
    monkeypatch.setattr(vqvae2.TwoLevelGenerator, "sampler", lambda self, *args, **kwargs: (
        calls.append((args, kwargs)) or sampler(self, *args, **kwargs)))
    two_level.main(argv)
    # count, bottom temperature, seed, top-k (none), and the top temperature
    assert calls == [((4, 1.0, 0, 0), {"top_temperature": 0.7})]
    for prefix in ("", "top_prior_", "bottom_prior_"):
        state = json.loads((out / f"{prefix}state.json").read_text())
        assert state["epochs_done"] == 1 and state["finished"]
    report = json.loads((out / "generate" / "generation_report.json").read_text())
    assert report["samples"] == 4 and report["code_maps"] == [[4, 4], [8, 8]]
    assert report["temperature"] == {"top": 0.7, "bottom": 1.0}  # the defaults
    levels = report["metrics"]["bits_per_test_code_by_level"]
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
    first_stage = TwoLevelVQVAE(image_size=32, width=8, code_dim=4, codebook_size=16)
    first_stage.save(out / "best.keras")  # one the priors never saw
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
    assert report["samples"] == 4
    assert 0 < report["metrics"]["bits_per_test_code_by_level"]["top"] < 8
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


def test_temperature_takes_one_for_both_priors_or_one_each(tmp_path, capsys):
    """--temperature T sets both priors', --temperature TOP BOTTOM each; none gives the
    defaults (a cooler top prior); three values, or one not above 0, is an error."""
    argv = tiny_experiment(tmp_path)
    assert two_level.parse_args(argv).temperature == [0.7, 1.0]
    assert two_level.parse_args(argv + ["--temperature", "0.9"]).temperature == [0.9, 0.9]
    assert two_level.parse_args(argv + ["--temperature", "0.8", "1.1"]).temperature == [0.8, 1.1]
    for bad in (["0.7", "1", "1"], ["0"], ["0.7", "-1"]):
        with pytest.raises(SystemExit):
            two_level.parse_args(argv + ["--temperature", *bad])
        assert f"--temperature takes one or two (TOP BOTTOM) positive numbers below 100, got " \
               f"{' '.join(str(float(value)) for value in bad)}" in capsys.readouterr().err


def test_data_gives_the_oasis_splits_and_the_slices_are_given_one_way(oasis_root, tmp_path,
                                                                    capsys):
    """--data ROOT (keras_png_slices_data or the folder holding it) gives the three splits, the
    samples measured against its test split unless --test-dir says otherwise, or against the
    validation split where it has none; --data with the folders, or neither, is an error, and
    so is a folder that is not an OASIS one."""
    split = lambda root, name: str(root / f"keras_png_slices_{name}")  # noqa: E731
    args = two_level.parse_args(["--data", str(oasis_root)])
    assert [args.train_dir, args.val_dir, args.test_dir] == [
        split(oasis_root, name) for name in ("train", "validate", "test")]
    args = two_level.parse_args(["--data", str(oasis_root.parent), "--test-dir", "mine"])
    assert args.train_dir == split(oasis_root, "train") and args.test_dir == "mine"
    no_test = tmp_path / "keras_png_slices_data"
    for name in ("train", "validate"):
        write_slices(no_test / f"keras_png_slices_{name}", 2)
    args = two_level.parse_args(["--data", str(no_test)])
    assert args.val_dir == split(no_test, "validate") and args.test_dir == ""
    for argv, message in (
            (["--data", str(oasis_root), "--train-dir", "a", "--val-dir", "b"], "not both"),
            (["--train-dir", "a"], "give the slices: --data ROOT"),
            (["--data", str(tmp_path / "nowhere")], "does not exist")):
        with pytest.raises(SystemExit):
            two_level.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.skipif(monitor.fcntl is None, reason="the run lock is POSIX's flock")
def test_a_second_run_in_the_same_out_is_refused(tmp_path):
    """While one process trains in --out (train.py's or two_level.py's lock), another is
    refused before it touches anything there but the lock file."""
    argv, out = tiny_experiment(tmp_path) + ["--generate", "0"], tmp_path / "out"
    with monitor.holding_run_lock(out):
        with pytest.raises(SystemExit, match="another train.py or two_level.py is running on"):
            two_level.main(argv)
    assert sorted(path.name for path in out.iterdir()) == [".lock"]


def test_sigterm_stops_at_the_next_batch_and_the_same_command_resumes(tmp_path):
    """A two_level.py process sent SIGTERM once its first stage saved an epoch exits with a
    message that names what is saved and the command to resume with; nothing half-kept (every
    logged epoch saved); that command (here with shorter limits) resumes the first stage from
    its saved epochs and trains the rest. Stopped once every stage is done, the message gives
    predict.py's command instead."""
    argv = tiny_experiment(tmp_path) + ["--generate", "0", "--minutes", "3", "3", "3"]
    out, logs = tmp_path / "out", [tmp_path / "stdout.txt", tmp_path / "stderr.txt"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        process = subprocess.Popen([sys.executable, "two_level.py", *argv], env=env,
                                   cwd=Path(two_level.__file__).parent, stdout=stdout,
                                   stderr=stderr)
    try:
        deadline = time.time() + 180
        while not ((out / "state.json").exists()
                   and json.loads((out / "state.json").read_text())["epochs_done"] >= 1):
            assert process.poll() is None, logs[1].read_text()
            assert time.time() < deadline, "timed out"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 1, logs[1].read_text()
    finally:
        process.kill()  # only if a check above failed: it has exited otherwise
    message = logs[1].read_text().strip().splitlines()
    done = json.loads((out / "state.json").read_text())["epochs_done"]
    assert f"stopped by SIGTERM: epochs saved in {out}: {done} of the first stage;" in message[-2]
    assert message[-1].strip() == shlex.join(["python", "two_level.py", *argv])

    def logged():
        with open(out / "training_log.csv") as log:
            return [int(row["epoch"]) for row in csv.DictReader(log)]

    assert logged() == list(range(done))
    assert not (out / "top_prior_state.json").exists()
    saved = (out / "last.keras").read_bytes()
    two_level.main(argv[:-4] + ["--minutes", "0.001", "0.001", "0.001"])
    first = json.loads((out / "state.json").read_text())  # its time was up: loaded, not anew
    assert first["epochs_done"] == done and logged() == list(range(done))
    assert (out / "last.keras").read_bytes() == saved
    for prefix in ("", "top_prior_", "bottom_prior_"):
        assert json.loads((out / f"{prefix}state.json").read_text())["finished"]
    draw = ["--checkpoint", str(out), "--generate", "16"]
    assert two_level.stop_message(out, "SIGINT", argv, draw) == (
        f"stopped by SIGINT: every stage is trained and saved in {out}. Draw the samples "
        f"with:\n  python predict.py {shlex.join(draw)}")
