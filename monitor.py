"""What train.py shows and keeps while it trains: a line per epoch, checkpoints, the progress
GIF and the plots. Checkpoints, state, JSON, frames, the GIF and the plots are written
atomically, so a killed run never leaves half of one; the CSV and TensorBoard logs are
appended to, a row or event at a time, by Keras.
"""

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def save_atomically(write, path):
    """write(tmp_path) then rename over `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name("tmp-" + path.name)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left if writing failed


def write_json(data, path):
    """Strict JSON (NaN or infinity raise ValueError instead of writing what JSON forbids)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    save_atomically(lambda tmp: Path(tmp).write_text(text), path)


def read_json(path):
    """A JSON file written by train.py, or a clear exit naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: could not read {path} ({error}): it is missing or damaged. Start a "
                 f"new run, or restore the file.")


def load_checkpoint(path):
    """A .keras checkpoint, or a clear exit naming it."""
    try:
        return keras.models.load_model(path)
    except Exception as error:
        sys.exit(f"error: could not load {path} ({str(error).splitlines()[0]}). It may "
                 f"be damaged or written by an older version of modules.py: train again.")


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


class Checkpoints(keras.callbacks.Callback):
    """Saves {prefix}last.keras every epoch and {prefix}best.keras when `monitor` improves,
    then {prefix}state.json (epochs done, time used, every val_ metric of the best epoch).
    An epoch with a NaN or infinite value saves nothing, stops training, and names the values
    in `not_finite` (every logged metric is bounded, PSNR included, so this means the model
    broke, never that it was perfect)."""

    def __init__(self, out, state, prefix="", monitor="val_ssim", higher_is_better=True):
        super().__init__()
        self.out, self.state, self.prefix = Path(out), state, prefix
        self.monitor, self.sign = monitor, 1.0 if higher_is_better else -1.0
        self.not_finite = []

    def on_epoch_end(self, epoch, logs=None):
        self.not_finite = sorted(name for name, value in logs.items() if not np.isfinite(value))
        if self.not_finite:
            self.model.stop_training = True  # this epoch is neither saved nor counted
            return
        save_atomically(self.model.save, self.out / f"{self.prefix}last.keras")
        best = self.state.get("best_" + self.monitor)
        if best is None or self.sign * (logs[self.monitor] - best) > 0:
            save_atomically(self.model.save, self.out / f"{self.prefix}best.keras")
            self.state.update({"best_" + k: float(v) for k, v in logs.items()
                               if k.startswith("val_")}, best_epoch=epoch + 1)
        self.state.update(epochs_done=epoch + 1, elapsed_minutes=logs["elapsed_minutes"])
        write_json(self.state, self.out / f"{self.prefix}state.json")


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
        frames = [imageio.imread(p) for p in sorted(self.frames.glob("epoch_*.png"))]
        save_atomically(lambda tmp: imageio.mimsave(tmp, frames, format="GIF", duration=500,
                                                    loop=0), Path(self.out) / "progress.gif")


class Plots(keras.callbacks.Callback):
    """After every epoch, reads the CSV log and calls draw(log, save) to redraw the plots, so
    a killed run still has up-to-date ones. log: {column: array}; save(fig, file name)."""

    def __init__(self, csv_path, out, draw):
        super().__init__()
        self.csv_path, self.out, self.draw = csv_path, Path(out), draw

    def on_epoch_end(self, epoch, logs=None):
        with open(self.csv_path) as f:
            rows = list(csv.DictReader(f))
        self.draw({key: np.array([float(r[key]) for r in rows]) for key in rows[0]}, self._save)

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
