"""Kill real train.py processes and resume them: nothing is lost, nothing is recorded twice.

The narrow windows (between an epoch's CSV row and its checkpoint, in the middle of writing a
checkpoint or the GIF, between the renames of a commit) are hit on purpose: monitor.crash_point
kills the process with SIGKILL when VQVAE_CRASH_AT names the point it has reached. One run is
killed at twelve such points in turn, each time resumed with `--resume`; a second run gets
SIGTERM and SIGINT from outside, as a scheduler and Ctrl-C would send them.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import modules  # noqa: F401  (registers the model classes for load_model)
import prior  # noqa: F401
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "--epochs", "3"]  # 24 training slices in batches of 8: 3 steps per epoch
STEPS_PER_EPOCH, PRIOR_STEPS_PER_EPOCH = 3, 3  # TINY's prior batches hold 8 code maps too

# (kill point, what the run has saved after it: VQ-VAE epochs, prior epochs); each kill happens
# in a process resumed after the one before, so the counts restart at 1 in each
KILLS = [
    ("train batch:2", 0, 0),             # during the first epoch
    ("validation batch:1", 0, 0),        # during its validation
    ("epoch logged:1", 0, 0),            # CSV row, frame and plots written, checkpoint not yet
    ("write last.keras:1", 0, 0),        # checkpoint in its temporary file, not in place
    ("commit:1", 1, 0),                  # commit decided, one rename of three done
    ("save progress.gif:1", 1, 0),       # second epoch: GIF written, not yet in place
    ("write state.json:1", 1, 0),        # every file of the epoch written, not committed
    ("epoch saved:1", 2, 0),             # second epoch committed, third not begun
    ("prior encoded train:1", 3, 0),     # the prior encoding the training split
    ("prior_epoch logged:1", 3, 0),      # the prior's first CSV row, no checkpoint
    ("write prior_last.keras:1", 3, 0),  # the prior's checkpoint written, not committed
    ("prior_epoch saved:1", 3, 1),       # the prior's first epoch committed
]


def train(out, data, *extra, crash_at=None):
    """A train.py process on the tiny run in `out`; its output goes to files beside `out` (a
    pipe nobody reads while the test waits could fill up and block it)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("VQVAE_CRASH_AT", None)
    if crash_at:
        env["VQVAE_CRASH_AT"] = crash_at
    argv = [sys.executable, "train.py", *extra, "--out", str(out)]
    if not {"--resume", "--prior-only"} & set(extra):
        argv += ["--data", str(data), *RUN]
    with open(out.parent / "stdout.txt", "w") as stdout, \
            open(out.parent / "stderr.txt", "w") as stderr:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)


def finish(process, timeout=240):
    """(exit code, stdout, stderr) of a train() process; a hung one is killed and fails."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    folder = Path(process.args[process.args.index("--out") + 1]).parent
    return (process.returncode, (folder / "stdout.txt").read_text(),
            (folder / "stderr.txt").read_text())


def logged_epochs(path):
    if not path.exists():
        return []
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def saved(out, prefix=""):
    path = out / f"{prefix}state.json"
    return json.loads(path.read_text())["epochs_done"] if path.exists() else 0


def check_finished_run(out, epochs=3, prior_epochs=2):
    """Everything the issue lists for a run that was killed, resumed and finished."""
    assert logged_epochs(out / "training_log.csv") == list(range(epochs))
    assert logged_epochs(out / "prior_training_log.csv") == list(range(prior_epochs))
    assert sorted(p.name for p in (out / "frames").iterdir()) == [
        f"epoch_{n:03d}.png" for n in range(1, epochs + 1)]
    assert Image.open(out / "progress.gif").n_frames == epochs
    for prefix, done, steps in (("", epochs, STEPS_PER_EPOCH),
                                ("prior_", prior_epochs, PRIOR_STEPS_PER_EPOCH)):
        state = json.loads((out / f"{prefix}state.json").read_text())
        last = keras.models.load_model(out / f"{prefix}last.keras")
        assert state["epochs_done"] == done and state["finished"]
        assert state["optimizer_steps"] == int(last.optimizer.iterations) == done * steps
        keras.models.load_model(out / f"{prefix}best.keras")
    with open(out / "training_log.csv") as f:
        for row in csv.DictReader(f):
            assert all(np.isfinite(float(value)) for value in row.values()), row
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith("tmp-")]
    assert not leftovers and not (out / "commit-pending.json").exists()


def test_sigkill_at_twelve_points_then_resume_loses_and_repeats_nothing(oasis_root, tmp_path):
    out = tmp_path / "run"
    for n, (point, vqvae_epochs, prior_epochs) in enumerate(KILLS):
        argv = ("--resume",) if n else ()
        code, stdout, stderr = finish(train(out, oasis_root, *argv, crash_at=point))
        assert code == -signal.SIGKILL, f"{point} was not reached:\n{stdout}\n{stderr}"
        if point == "commit:1":  # the next start completes this commit: epoch 1 is saved
            assert (out / "commit-pending.json").exists()
        else:
            assert (saved(out), saved(out, "prior_")) == (vqvae_epochs, prior_epochs), point
            # a logged epoch beyond the saved ones is trimmed when the run resumes
            assert logged_epochs(out / "training_log.csv")[:vqvae_epochs] == list(
                range(vqvae_epochs))
    code, stdout, stderr = finish(train(out, oasis_root, "--resume"))
    assert code == 0, stderr
    check_finished_run(out)
    # asked for a 4th epoch, killed in it: a plain --resume must still train that epoch
    code, _, _ = finish(train(out, oasis_root, "--resume", "--epochs", "4",
                              crash_at="train batch:1"))
    assert code == -signal.SIGKILL
    code, stdout, stderr = finish(train(out, oasis_root, "--resume"))
    assert code == 0, stderr
    check_finished_run(out, epochs=4)  # and a new prior for the VQ-VAE's new codes


def test_prior_only_after_a_kill_drops_the_unsaved_epoch_of_the_vqvae(oasis_root, tmp_path):
    out = tmp_path / "run"
    code, _, _ = finish(train(out, oasis_root, "--prior-epochs", "0",
                              crash_at="epoch logged:2"))
    assert code == -signal.SIGKILL and logged_epochs(out / "training_log.csv") == [0, 1]
    code, stdout, stderr = finish(train(out, oasis_root, "--prior-only", "--prior-epochs", "1"))
    assert code == 0, stderr
    assert logged_epochs(out / "training_log.csv") == [0]  # epoch 2 was never saved
    assert [p.name for p in (out / "frames").iterdir()] == ["epoch_001.png"]
    assert Image.open(out / "progress.gif").n_frames == 1
    assert saved(out, "prior_") == 1


def wait_for(condition, process, seconds=180):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, finish(process)
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT)])
def test_sigterm_and_sigint_stop_cleanly_and_say_how_to_resume(oasis_root, tmp_path, first,
                                                               second):
    out = tmp_path / "run"
    process = train(out, oasis_root)
    wait_for(lambda: saved(out) >= 1, process)
    process.send_signal(first)
    code, stdout, stderr = finish(process)
    assert code == 1 and f"stopped by {first.name}" in stderr
    assert stderr.strip().splitlines()[-1].strip() == f"python train.py --resume --out {out}"
    done = saved(out)
    assert logged_epochs(out / "training_log.csv") == list(range(done))  # nothing half-kept

    process = train(out, oasis_root, "--resume")
    wait_for(lambda: saved(out, "prior_") >= 1 or saved(out) > done, process)
    process.send_signal(second)
    process.send_signal(second)  # impatient: the second one stops at once, still cleanly
    code, stdout, stderr = finish(process)
    assert code == 1 and f"stopped by {second.name}" in stderr, stderr
    assert stderr.strip().splitlines()[-1].strip() == f"python train.py --resume --out {out}"

    code, stdout, stderr = finish(train(out, oasis_root, "--resume"))
    assert code == 0, stderr
    check_finished_run(out)
