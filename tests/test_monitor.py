import json
import math

import keras
import pytest
from PIL import Image

import monitor


def tiny_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("higher_is_better, best_epoch", [(True, 2), (False, 3)])
def test_checkpoints_keep_the_best_epoch_by_the_monitored_value(tmp_path, higher_is_better,
                                                                best_epoch):
    model, state = tiny_model(), {}
    checkpoints = monitor.Checkpoints(tmp_path, state, "prior_", "val_bits",
                                      higher_is_better=higher_is_better)
    checkpoints.set_model(model)
    for epoch, bits in enumerate([2.0, 3.0, 1.0]):
        checkpoints.on_epoch_end(epoch, {"val_bits": bits, "elapsed_minutes": epoch + 1.0,
                                         "epoch_seconds": 60.0})
    saved = json.loads((tmp_path / "prior_state.json").read_text())
    assert saved["best_epoch"] == best_epoch and saved["epochs_done"] == 3
    assert saved["best_val_bits"] == (3.0 if higher_is_better else 1.0)
    assert {p.name for p in tmp_path.iterdir()} == {"prior_last.keras", "prior_best.keras",
                                                    "prior_state.json"}


def test_wall_clock_stops_before_an_epoch_would_pass_the_limit(capsys):
    model = tiny_model()
    clock = monitor.WallClock(10, limit_minutes=1.0, elapsed_before=50.0,
                              describe=lambda logs: "fine", name="prior ")
    clock.set_model(model)
    clock.on_epoch_begin(0)
    clock.started -= 6.0  # pretend the epoch took 6 s: 56 s done, another would pass 60 s
    logs = {}
    clock.on_epoch_end(0, logs)
    assert model.stop_training and logs["elapsed_minutes"] == pytest.approx(56 / 60, abs=0.01)
    assert "prior epoch 1/10: fine, 6 s" in capsys.readouterr().out


def test_cosine_over_time_anneals_the_rate_to_zero_at_the_time_limit():
    model = tiny_model()
    clock = monitor.WallClock(10, limit_minutes=1.0, elapsed_before=30.0)
    schedule = monitor.CosineOverTime(clock, base_rate=1e-3)
    for callback in (clock, schedule):
        callback.set_model(model)
    clock.on_epoch_begin(0)
    schedule.on_train_batch_begin(0)  # 30 of 60 s used (an earlier part): half the rate
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-4, rel=0.01)
    assert schedule.rate(15.0) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    clock.started -= 45.0  # 75 s used: past the limit, the rate stays at 0
    schedule.on_train_batch_begin(1)
    logs = {}
    schedule.on_epoch_end(0, logs)
    assert logs["learning_rate"] == float(model.optimizer.learning_rate) == 0.0
    unlimited = monitor.CosineOverTime(monitor.WallClock(10, limit_minutes=0), base_rate=1e-3)
    assert unlimited.rate(1e6) == 1e-3


def test_save_atomically_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.json"
    monitor.write_json({"epochs_done": 1}, path)

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        monitor.save_atomically(broken, path)
    assert json.loads(path.read_text()) == {"epochs_done": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no half-written leftover


def test_a_nan_epoch_is_neither_saved_nor_counted(tmp_path):
    model, state = tiny_model(), {"epochs_done": 1}
    checkpoints = monitor.Checkpoints(tmp_path, state, monitor="val_bits",
                                      higher_is_better=False)
    checkpoints.set_model(model)
    checkpoints.on_epoch_end(1, {"val_bits": float("nan"), "elapsed_minutes": 2.0,
                                   "epoch_seconds": 60.0})
    assert model.stop_training and state == {"epochs_done": 1}
    assert list(tmp_path.iterdir()) == []


def test_a_not_finite_value_is_named_and_strict_json_refuses_it(tmp_path):
    model, state = tiny_model(), {}
    checkpoints = monitor.Checkpoints(tmp_path, state)
    checkpoints.set_model(model)
    checkpoints.on_epoch_end(0, {"loss": 0.1, "val_ssim": float("nan"), "val_psnr": 100.0,
                                 "elapsed_minutes": 1.0})
    assert checkpoints.not_finite == ["val_ssim"] and model.stop_training
    with pytest.raises(ValueError):
        monitor.write_json({"psnr": float("inf")}, tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_save_together_leaves_all_old_or_all_new_files(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("old")

    def broken(path):
        raise OSError("killed here")

    with pytest.raises(OSError):  # the second write fails: nothing is committed
        monitor.save_together({"a.txt": lambda p: open(p, "w").write("new"), "b.txt": broken},
                              tmp_path)
    monitor.remove_leftovers(tmp_path)  # what the next start does
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "old",
                                                                   "b.txt": "old"}
    monitor.save_together({name: lambda p: open(p, "w").write("new") for name in
                           ("a.txt", "b.txt")}, tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "new",
                                                                   "b.txt": "new"}


def test_a_commit_cut_short_between_its_renames_is_finished_on_the_next_start(tmp_path):
    """As if killed after the commit was marked and one of three files renamed."""
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "tmp-epoch_004.png").write_text("half a frame")
    (tmp_path / "a.txt").write_text("new")  # renamed already
    for name in ("b.txt", "c.txt"):
        (tmp_path / name).write_text("old")
        (tmp_path / f"tmp-{name}").write_text("new")
    monitor.write_json(["a.txt", "b.txt", "c.txt"], tmp_path / monitor.COMMIT)
    monitor.remove_leftovers(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.glob("*.txt")} == {
        "a.txt": "new", "b.txt": "new", "c.txt": "new"}
    assert not (tmp_path / monitor.COMMIT).exists()
    assert list((tmp_path / "frames").iterdir()) == []  # a killed write is never kept


def test_rewinding_drops_the_log_rows_and_frames_of_an_unsaved_epoch(tmp_path):
    (tmp_path / "frames").mkdir()
    for epoch in (1, 2, 3):
        Image.new("L", (8, 8), 40 * epoch).save(tmp_path / "frames" / f"epoch_{epoch:03d}.png")
    header = ("epoch,loss,reconstruction_loss,vq_loss,val_loss,val_reconstruction_loss,"
              "val_vq_loss,val_ssim,val_psnr\n")
    rows = "".join(f"{e},0.5,0.4,0.1,0.5,0.4,0.1,0.9,30\n" for e in range(3))
    (tmp_path / "training_log.csv").write_text(header + rows + "3,0.5,0.4")  # cut mid-row
    monitor.rewind_vqvae_outputs(tmp_path, 2)
    assert (tmp_path / "training_log.csv").read_text().replace("\r", "") == (
        header + rows.rsplit("2,", 1)[0])
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["epoch_001.png",
                                                                       "epoch_002.png"]
    assert Image.open(tmp_path / "progress.gif").n_frames == 2
    assert (tmp_path / "ssim_curve.png").exists()  # plots redrawn from the trimmed log
