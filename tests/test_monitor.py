import json

import keras
import pytest

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
        checkpoints.on_epoch_end(epoch, {"val_bits": bits, "elapsed_minutes": epoch + 1.0})
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
    checkpoints.on_epoch_end(1, {"val_bits": float("nan"), "elapsed_minutes": 2.0})
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
