"""What train.py shows and keeps while it trains: a line per epoch, checkpoints, the progress
GIF and the plots, and how it survives being killed.

An epoch is recorded completely or not at all. Its CSV row, progress frame, GIF and plots are
written first; then its checkpoints and state.json are committed together (`save_together`).
A run killed at any point resumes after the last committed epoch: `remove_leftovers` completes
a commit that was marked and deletes the temporary files of one that was not, and
`rewind_vqvae_outputs` / `trim_log` drop any rows and frames of an epoch never committed.
Every file except the CSV and TensorBoard logs (appended to by Keras, a row or event at a
time) is written atomically.
SIGINT (Ctrl-C) and SIGTERM (sent by Slurm and other schedulers) stop training at the next
batch and drop the epoch in progress (`catching_stop_signals`, `StopOnSignal`).
"""

import collections
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import imageio.v2 as imageio
import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


COMMIT = "commit-pending.json"  # lists the files of a save_together that must be renamed
_crash_counts = collections.Counter()


def crash_point(name):
    """Fault injection for tests/test_kill.py: with VQVAE_CRASH_AT="name:n" in the environment,
    the n-th time the run reaches `name` it kills itself with SIGKILL, so that the test hits
    the narrow windows that random kills miss. Without that variable it does nothing."""
    point, _, count = os.environ.get("VQVAE_CRASH_AT", "").partition(":")
    if point == name:
        _crash_counts[name] += 1
        if _crash_counts[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def flush_to_disk(path):
    """fsync a file (or a folder, after a rename in it), so that a crash of the whole machine,
    not only of this process, finds complete files. (Windows cannot open folders: skipped.)"""
    if os.name == "nt" and Path(path).is_dir():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_atomically(write, path):
    """write(tmp_path) then rename over `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name("tmp-" + path.name)
    try:
        write(str(tmp))
        flush_to_disk(tmp)
        crash_point("save " + path.name)
        os.replace(tmp, path)
        flush_to_disk(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only left if writing failed


def save_together(writers, folder):
    """Write several files so that a kill leaves either all the old ones or all the new ones.

    writers: {file name: write(path)}, called in order, each into tmp-<name>. Once all are
    complete, COMMIT (the list of names) is written atomically: from then on the new files are
    the truth, and `finish_saves` renames them into place, now or when a killed run restarts.
    A kill before COMMIT exists leaves the old files; `remove_leftovers` deletes the
    temporaries when the run restarts.
    """
    folder = Path(folder)
    for name, write in writers.items():
        write(str(folder / f"tmp-{name}"))
        flush_to_disk(folder / f"tmp-{name}")
        crash_point("write " + name)
    write_json(list(writers), folder / COMMIT)
    finish_saves(folder)


def finish_saves(folder):
    """Renames the files of a committed save_together into place (also one that a kill
    interrupted half-way through its renames: renaming again is harmless)."""
    folder = Path(folder)
    if (folder / COMMIT).exists():
        for name in json.loads((folder / COMMIT).read_text()):
            if (folder / f"tmp-{name}").exists():
                os.replace(folder / f"tmp-{name}", folder / name)
                crash_point("commit")
        flush_to_disk(folder)
        (folder / COMMIT).unlink()


def remove_leftovers(folder):
    """At the start of a run: finish a committed save, then delete the tmp-* files of writes
    that a kill cut short (in the run folder and its frames/), so none is ever loaded."""
    folder = Path(folder)
    finish_saves(folder)
    for leftover in [*folder.glob("tmp-*"), *folder.glob("frames/tmp-*")]:
        if leftover.is_file():
            leftover.unlink()


def json_text(data):
    """Strict JSON (NaN or infinity raise ValueError instead of writing what JSON forbids)."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(data, path):
    text = json_text(data)
    save_atomically(lambda tmp: Path(tmp).write_text(text), path)


def trim_log(csv_path, epochs_done):
    """Keep only the CSV rows of committed epochs (a killed run may have logged one more, or
    part of one)."""
    if not Path(csv_path).exists():
        return False
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit()
                       and int(row[0]) < epochs_done and len(row) == len(rows[0])]
    if kept != rows:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
        save_atomically(write, csv_path)
    return kept != rows


def read_json(path):
    """A JSON file written by train.py, or a clear exit naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: could not read {path} ({error}): it is missing or damaged. Start a "
                 f"new run, or restore the file.")


def load_checkpoint(path, kind=keras.Model):
    """A .keras checkpoint holding a `kind` model, or a clear exit that names the file and
    says what is wrong. Loaded in Keras' safe mode: a file that carries code (a Lambda layer)
    is refused, never run."""
    path = Path(path)
    problem = ("does not exist" if not path.exists() else "is empty" if path.stat().st_size == 0
               else "is not a Keras model file (.keras files are zip archives): it is damaged "
                    "or truncated, or another kind of file" if not zipfile.is_zipfile(path)
               else None)
    if problem is None:
        try:
            model = keras.models.load_model(path, safe_mode=True)
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            problem = ("holds code (a Lambda layer), which safe mode refuses to run"
                       if "lambda" in str(error).lower() else
                       f"could not be loaded ({type(error).__name__}: {first_line}); it may be "
                       f"damaged, or written by another version of modules.py or prior.py")
        else:
            if isinstance(model, kind):
                return model
            problem = f"holds a {type(model).__name__} model, not a {kind.__name__}"
    sys.exit(f"error: {path} {problem}. Restore it from a backup, or train again.")


def file_sha256(path):
    """Ties a prior to the exact VQ-VAE checkpoint whose codes it learned."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class WallClock(keras.callbacks.Callback):
    """Adds epoch_seconds and elapsed_minutes to the logs, prints `describe(logs)` as one line
    per epoch, and stops training when another epoch would overrun the time limit."""

    def __init__(self, epochs, limit_minutes, elapsed_before=0.0, describe=str, name=""):
        super().__init__()
        self.epochs, self.limit, self.elapsed = epochs, (limit_minutes or 0) * 60, elapsed_before
        self.describe, self.name = describe, name

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.time() - self.started
        self.elapsed += seconds
        logs.update(epoch_seconds=seconds, elapsed_minutes=self.elapsed / 60)
        print(f"{self.name}epoch {epoch + 1}/{self.epochs}: {self.describe(logs)}, "
              f"{seconds:.0f} s ({self.elapsed / 60:.1f} min in all)", flush=True)
        if self.limit and self.elapsed + seconds > self.limit:
            print(f"another epoch would pass the time limit of {self.limit / 60:g} min: "
                  f"stopping.", flush=True)
            self.model.stop_training = True


class CosineOverTime(keras.callbacks.Callback):
    """Anneals the learning rate over a time limit: before each batch it is set to

        rate = base_rate * (1 + cos(pi * min(1, used / limit))) / 2

    where `used` is the training time `clock` (the run's WallClock) has counted so far,
    resumed parts included: a time-limited run ends near rate 0, on settled weights, wherever
    the limit falls. Without a limit the rate stays base_rate. Logs the rate each epoch as
    learning_rate; place it after `clock` and before the callbacks that write the logs."""

    def __init__(self, clock, base_rate):
        super().__init__()
        self.clock, self.base_rate = clock, base_rate

    def rate(self, used_seconds):
        if not self.clock.limit:
            return self.base_rate
        share = min(1.0, used_seconds / self.clock.limit)
        return self.base_rate * (1 + math.cos(math.pi * share)) / 2

    def on_train_batch_begin(self, batch, logs=None):
        used = self.clock.elapsed + time.time() - self.clock.started
        self.model.optimizer.learning_rate = self.rate(used)

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(self.model.optimizer.learning_rate)


class Checkpoints(keras.callbacks.Callback):
    """Commits, together (save_together), {prefix}last.keras every epoch, {prefix}best.keras
    when `monitor` improves, and {prefix}state.json (epochs done, optimizer steps, time used,
    every val_ metric of the best epoch). Place it after the callbacks that log the epoch.
    An epoch with a NaN or infinite value saves nothing, stops training, and names the values
    in `not_finite` (every logged metric is bounded, PSNR included, so this means the model
    broke, never that it was perfect)."""

    def __init__(self, out, state, prefix="", monitor="val_ssim", higher_is_better=True,
                 log=None):
        super().__init__()
        self.out, self.state, self.prefix, self.log = Path(out), state, prefix, log
        self.monitor, self.sign = monitor, 1.0 if higher_is_better else -1.0
        self.not_finite = []

    def on_epoch_end(self, epoch, logs=None):
        self.not_finite = sorted(name for name, value in logs.items() if not np.isfinite(value))
        if self.not_finite:
            self.model.stop_training = True  # this epoch is neither saved nor counted
            return
        crash_point(self.prefix + "epoch logged")
        if self.log:  # the epoch's CSV row must be on disk before the epoch is committed
            flush_to_disk(self.log)
        last, best = f"{self.prefix}last.keras", f"{self.prefix}best.keras"
        writers = {last: self.model.save}
        best_value = self.state.get("best_" + self.monitor)
        if best_value is None or self.sign * (logs[self.monitor] - best_value) > 0:
            writers[best] = self._copy_best
            self.state.update({"best_" + k: float(v) for k, v in logs.items()
                               if k.startswith("val_")}, best_epoch=epoch + 1)
        self.state.update(epochs_done=epoch + 1, elapsed_minutes=logs["elapsed_minutes"],
                          epoch_seconds=logs["epoch_seconds"],
                          optimizer_steps=int(self.model.optimizer.iterations.numpy()))
        writers[f"{self.prefix}state.json"] = lambda path: Path(path).write_text(
            json_text(self.state))  # last: it records best_sha256
        save_together(writers, self.out)
        crash_point(self.prefix + "epoch saved")

    def _copy_best(self, path):
        """The model just written to tmp-last is the new best: copy it (do not save twice)
        and record its SHA-256, which tells a prior whether its VQ-VAE has changed."""
        shutil.copyfile(self.out / f"tmp-{self.prefix}last.keras", path)
        self.state["best_sha256"] = file_sha256(path)


@contextlib.contextmanager
def holding_run_lock(out):
    """One training process at a time per run folder, train.py or two_level.py (a second would
    delete the first one's temporary files and interleave their epochs). An OS lock: a killed
    process releases it."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / ".lock", "w") as handle:
        if fcntl is not None:  # POSIX; on Windows the folder is not locked
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(f"error: another train.py or two_level.py is running on {out}: wait "
                         f"for it to end, or stop it, or give another --out.")
        yield


class Interrupted(Exception):
    """Training was stopped by a signal (its name is the message)."""


_stop_signals = []  # names of the signals received, filled by catching_stop_signals' handler


@contextlib.contextmanager
def catching_stop_signals():
    """While inside: SIGINT and SIGTERM only note that they arrived, and StopOnSignal stops
    training at the next batch. A second one stops at once (the files stay consistent: every
    write is atomic, and an epoch is committed whole)."""
    def note(signum, frame):
        if _stop_signals:
            raise KeyboardInterrupt
        _stop_signals.append(signal.Signals(signum).name)
        # os.write, not print: a handler may run in the middle of another print
        os.write(2, f"\n{_stop_signals[0]} received: stopping at the next batch and dropping "
                    f"the epoch in progress (on a cluster of workers: at the end of this "
                    f"epoch, all together); send it again to stop at once.\n".encode())

    _stop_signals.clear()
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_signal_received():
    """The name of the first SIGINT or SIGTERM caught, or None."""
    return _stop_signals[0] if _stop_signals else None


def settle_after_stop(out, stop):
    """In a run's handler of Interrupted or KeyboardInterrupt (a second signal), inside
    catching_stop_signals: ignore more signals until it ends (a third must not cut the message
    short), finish a commit that a second signal stopped half-way, and return the first
    signal's name."""
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, signal.SIG_IGN)
    finish_saves(out)
    return str(stop) or stop_signal_received() or "Ctrl-C"


class StopOnSignal(keras.callbacks.Callback):
    """Raises Interrupted at the first batch end (training or validation) after SIGINT or
    SIGTERM, so that fit() ends before the epoch is logged or saved; placed last, it also
    stops right after an epoch was committed.

    With `agree` (flag -> True on every worker if True on any, distribute.stop_agreement), on
    a cluster of workers, it acts at epoch ends only, and there also makes every worker stop
    training if any one would (a time limit): a worker that stopped alone, or went on alone,
    would leave the others waiting forever for its gradients."""

    def __init__(self, agree=None):
        super().__init__()
        self.agree = agree

    def _check(self):
        if _stop_signals and self.agree is None:
            raise Interrupted(_stop_signals[0])

    def on_train_batch_end(self, batch, logs=None):
        crash_point("train batch")
        self._check()

    def on_test_batch_end(self, batch, logs=None):
        crash_point("validation batch")
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        if self.agree is None:
            return self._check()
        if self.agree(bool(_stop_signals)):
            raise Interrupted(_stop_signals[0] if _stop_signals else "a signal to another worker")
        self.model.stop_training = self.agree(self.model.stop_training)


def rewind_vqvae_outputs(out, epochs_done):
    """Make the VQ-VAE's log, frames, GIF and plots show exactly its `epochs_done` committed
    epochs (a killed run may have recorded part of one more)."""
    out = Path(out)
    trimmed = trim_log(out / "training_log.csv", epochs_done)
    extra = [frame for frame in frame_files(out) if int(frame.stem[6:]) > epochs_done]
    for frame in extra:
        frame.unlink()
    if extra or trimmed:
        build_gif(out)
        Plots(out / "training_log.csv", out, draw_vqvae_curves).redraw()


def frame_files(out):
    """frames/epoch_NNN.png in epoch order (other files there are not frames)."""
    return sorted(p for p in (Path(out) / "frames").glob("epoch_*.png") if p.stem[6:].isdigit())


def build_gif(out):
    """progress.gif from every frame in frames/, in epoch order (none: no GIF)."""
    frames = [imageio.imread(p) for p in frame_files(out)]
    if frames:
        save_atomically(lambda tmp: imageio.mimsave(tmp, frames, format="GIF", duration=500,
                                                    loop=0), Path(out) / "progress.gif")
    else:
        (Path(out) / "progress.gif").unlink(missing_ok=True)


class ProgressGif(keras.callbacks.Callback):
    """Each epoch: reconstruct fixed validation images into frames/epoch_NNN.png, rebuild
    progress.gif from every frame so far (so a resumed run keeps its history)."""

    def __init__(self, images, out, tile=128):
        super().__init__()
        self.images, self.frames, self.out, self.tile = images, Path(out) / "frames", out, tile
        self.frames.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        reconstructions = self.model.predict(self.images, verbose=0)
        pair = np.concatenate([np.concatenate(list(row), axis=1)
                               for row in (self.images, reconstructions)], axis=0)
        frame = Image.fromarray((pair[..., 0] * 255).round().astype(np.uint8))
        frame = frame.resize((self.tile * len(self.images), self.tile * 2), Image.BILINEAR)
        canvas = Image.new("L", (frame.width, frame.height + 16))
        canvas.paste(frame, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), f"epoch {epoch + 1}   top: original   bottom: "
                                    f"reconstruction   val SSIM {logs['val_ssim']:.4f}", fill=255)
        save_atomically(lambda tmp: canvas.save(tmp, format="PNG"),
                        self.frames / f"epoch_{epoch + 1:03d}.png")
        build_gif(self.out)


class Plots(keras.callbacks.Callback):
    """After every epoch, reads the CSV log and calls draw(log, save) to redraw the plots, so
    a killed run still has up-to-date ones. log: {column: array}; save(fig, file name)."""

    def __init__(self, csv_path, out, draw):
        super().__init__()
        self.csv_path, self.out, self.draw = csv_path, Path(out), draw

    def on_epoch_end(self, epoch, logs=None):
        self.redraw()

    def redraw(self):
        with open(self.csv_path) as f:
            rows = list(csv.DictReader(f))
        if rows:
            self.draw({key: np.array([float(r[key]) for r in rows]) for key in rows[0]},
                      self._save)

    def _save(self, fig, name):
        fig.tight_layout()
        save_atomically(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), self.out / name)
        plt.close(fig)


def draw_vqvae_curves(log, save):
    """loss_curves_linear.png, loss_curves_log.png and ssim_curve.png."""
    epochs = log["epoch"] + 1
    for scale in ("linear", "log"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, color in (("loss", "black"), ("reconstruction_loss", "tab:blue"),
                           ("vq_loss", "tab:orange")):
            ax.plot(epochs, log[key], color=color, label=f"train {key}")
            ax.plot(epochs, log["val_" + key], "--", color=color, label=f"validation {key}")
        ax.set(xlabel="epoch", ylabel="loss", yscale=scale, title=f"Losses ({scale} scale)")
        ax.legend(fontsize=8)
        save(fig, f"loss_curves_{scale}.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, log["val_ssim"], "o-", color="tab:blue")
    ax.set(xlabel="epoch", ylabel="mean SSIM (whole validation split)",
           title="Validation SSIM and PSNR")
    twin = ax.twinx()
    twin.plot(epochs, log["val_psnr"], "s--", color="tab:red")
    twin.set_ylabel("mean PSNR (dB)", color="tab:red")
    save(fig, "ssim_curve.png")


def prior_curve_drawer(baselines):
    """A draw function for prior_bits_curve.png: train and validation bits per code, with
    horizontal lines at the baselines {name: bits per code}."""
    def draw(log, save):
        epochs = log["epoch"] + 1
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(epochs, log["bits_per_code"], "o-", label="train")
        ax.plot(epochs, log["val_bits_per_code"], "s--", label="validation")
        for (name, bits), style in zip(baselines.items(), (":", "-.", "--")):
            ax.axhline(bits, color="gray", linestyle=style, label=f"{name} ({bits:.2f})")
        ax.set(xlabel="epoch", ylabel="bits per code", title="PixelCNN prior: bits per code")
        ax.legend(fontsize=8)
        save(fig, "prior_bits_curve.png")
    return draw
