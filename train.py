"""Train the VQ-VAE on OASIS brain slices (or the built-in demo set) and watch it learn.

    python train.py                                    # OASIS at data/, else the demo set
    python train.py --data path/to/keras_png_slices_data --epochs 30
    python train.py --train-dir ../shared/data/brain-slices/train \
                    --val-dir ../shared/data/brain-slices/validate --time-limit 30
    python train.py --resume                           # continue the run in --out

Everything lands in --out (default out/): best.keras and last.keras (checkpoints, written
atomically), config.json (what predict.py reads), training_log.csv, tensorboard/, plots,
progress frames and progress.gif.
"""

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import imageio.v2 as imageio  # noqa: E402
import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import dataset  # noqa: E402
import modules  # noqa: E402

DEMO_ROOT, OASIS_DEFAULT = Path("data/demo"), Path("data/keras_png_slices_data")
DEMO_MINUTES = 7.0  # so the first `python train.py` ends within 10 minutes on a 2-core CPU


@dataclasses.dataclass
class Config:
    # data: an OASIS root, or explicit split folders; empty = OASIS at data/, else the demo set
    data: str = ""
    train_dir: str = ""
    val_dir: str = ""
    test_dir: str = ""
    out: str = "out"
    image_size: int = 256
    # optimisation
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    time_limit: float | None = None  # minutes of training; 0 = no limit; None = unset
    precision: str = "auto"  # auto | float32 | mixed_bfloat16
    seed: int = 0
    # model
    downsample: int = 4
    width: int = 64
    res_blocks: int = 1
    code_dim: int = 32
    codebook_size: int = 512
    beta: float = 0.25
    codebook: str = "ema"  # ema | loss (the original codebook loss)
    ema_decay: float = 0.99
    dead_code_steps: int = 100
    progress_images: int = 6


HELP = {
    "data": "OASIS root holding keras_png_slices_{train,validate,test}",
    "train_dir": "folder of training slices (PNG/JPEG); needs --val-dir",
    "val_dir": "folder of validation slices",
    "test_dir": "folder of test slices (optional; saved for predict.py)",
    "out": "output folder", "image_size": "images are fitted into this square (pixels)",
    "epochs": "epochs in all (a resumed run counts the epochs already done)",
    "batch_size": "images per training step", "learning_rate": "Adam learning rate",
    "time_limit": "stop when another epoch would pass this many minutes of training, resumed "
                  "parts included (0: no limit; unset: none, or 7 on the demo set)",
    "precision": "auto: mixed_bfloat16 where the hardware has fast bfloat16, else float32",
    "seed": "seed for weights, shuffling and the demo set",
    "downsample": "image-to-latent-grid factor (4: 64x64 codes at 256 px, 8: 32x32)",
    "width": "channels at the latent resolution (at least 8)",
    "res_blocks": "residual blocks at the latent resolution, in encoder and decoder",
    "code_dim": "code vector dimension D", "codebook_size": "number of codes K",
    "beta": "commitment cost",
    "codebook": "ema: exponential moving averages; loss: learned by the codebook loss",
    "ema_decay": "decay of the codebook moving averages",
    "dead_code_steps": "re-seed a code after this many training steps unused",
    "progress_images": "validation images shown in the progress GIF",
}
RESUMABLE = ("epochs", "time_limit", "out")  # the settings a resumed run may be given


def parse_args(argv=None):
    """(Config, resume?) from the command line. Flags default to None here so that the ones
    actually given can be told apart (a resumed run takes the rest from its config.json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        choices = {"precision": ["auto", "float32", "mixed_bfloat16"],
                   "codebook": ["ema", "loss"]}.get(field.name)
        kind = float if field.name == "time_limit" else type(field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind,
                            choices=choices, help=f"{HELP[field.name]} (default: "
                                                  f"{field.default!r})")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out with its saved settings "
                             "(only --epochs and --time-limit may be given)")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if args.resume:
        if set(given) - set(RESUMABLE):
            parser.error(f"--resume keeps the saved settings: only --epochs, --time-limit and "
                         f"--out may be given, not {', '.join(sorted(set(given) - set(RESUMABLE)))}")
        config = Config(**{**saved_settings(given.get("out", Config.out)), **given})
    else:
        config = Config(**given)
    check(config, parser)
    return config, args.resume


def check(config, parser):
    """Refuse impossible settings before any work is done."""
    at_least_one = ("image_size", "epochs", "batch_size", "code_dim", "progress_images",
                    "dead_code_steps")
    problems = {f"--{name.replace('_', '-')} must be at least 1": getattr(config, name) < 1
                for name in at_least_one}
    problems |= {"--width must be at least 8": config.width < 8,
                "--codebook-size must be at least 2": config.codebook_size < 2,
                "--res-blocks cannot be negative": config.res_blocks < 0,
                "--seed must be between 0 and 2**32 - 1": not 0 <= config.seed < 2**32,
                "--learning-rate must be a positive number": not 0 < config.learning_rate < 1e3,
                "--beta must be a number >= 0": not 0 <= config.beta < 1e6,
                "--ema-decay must be between 0 and 1": not 0 < config.ema_decay < 1,
                "--time-limit must be a number >= 0": config.time_limit is not None
                and not 0 <= config.time_limit < 1e9,
                f"--out {config.out} is a file, not a folder": Path(config.out).is_file(),
                f"--downsample must be 2, 4, 8 or 16 and divide --image-size "
                f"({config.image_size})": config.downsample not in (2, 4, 8, 16)
                or config.image_size % config.downsample != 0}
    for message, failed in problems.items():
        if failed:
            parser.error(message)


def saved_settings(out):
    """The settings saved by the run in `out` (for --resume)."""
    path = Path(out) / "config.json"
    for needed in (path, path.with_name("last.keras"), path.with_name("state.json")):
        if not needed.exists():
            sys.exit(f"error: --resume needs {needed}, which does not exist: start a run with "
                     f"this --out first (or check --out).")
    return json.loads(path.read_text())["train"]


def resolve_splits(config):
    """Absolute split folders {'train', 'validate', 'test'} (test may be None). With no data
    given it builds the demo set and, unless --time-limit is set, caps the demo run's time."""
    if config.train_dir or config.val_dir:
        if not (config.train_dir and config.val_dir):
            sys.exit("error: --train-dir and --val-dir go together: give both.")
        return {"train": str(Path(config.train_dir).resolve()),
                "validate": str(Path(config.val_dir).resolve()),
                "test": str(Path(config.test_dir).resolve()) if config.test_dir else None}
    root = config.data or (OASIS_DEFAULT if OASIS_DEFAULT.is_dir() else None)
    if root is None:
        root = demo_root(config.seed)
        if config.time_limit is None:
            config.time_limit = DEMO_MINUTES
            print(f"demo run: training stops after about {DEMO_MINUTES:g} minutes "
                  f"(set --time-limit to change).", flush=True)
    dirs = dataset.oasis_split_dirs(root, need_test=False)  # training can go without a test set
    return {split: str(path.resolve()) if path else None for split, path in dirs.items()}


def demo_root(seed):
    print("=" * 78 + "\nNO DATA GIVEN: using the DEMO stand-in, augmented slices of one brain "
          "(the MNI152\ntemplate shipped with nilearn). Results on it say little about OASIS. "
          "For real data\nunpack keras_png_slices_data into data/ or pass --data PATH "
          "(see README).\n" + "=" * 78, flush=True)
    marker = DEMO_ROOT / "complete"
    if not marker.exists() or marker.read_text() != f"seed {seed}\n":
        start, staging = time.time(), DEMO_ROOT.with_name("demo.partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
        dataset.build_demo_dataset(staging, seed=seed)
        (staging / "complete").write_text(f"seed {seed}\n")
        shutil.rmtree(DEMO_ROOT, ignore_errors=True)  # built for another seed
        staging.replace(DEMO_ROOT)
        print(f"built the demo set in {DEMO_ROOT} ({time.time() - start:.0f} s)", flush=True)
    return DEMO_ROOT


def choose_precision(choice):
    if choice != "auto":
        return choice
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability",
                                                                       (0, 0))[0]
        return "mixed_bfloat16" if major >= 8 else "float32"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def build_model(config, data_variance):
    """The one way train.py makes a fresh VQ-VAE from a Config."""
    model = modules.VQVAE(
        image_size=config.image_size, downsample=config.downsample, width=config.width,
        res_blocks=config.res_blocks, code_dim=config.code_dim,
        codebook_size=config.codebook_size, beta=config.beta,
        use_ema=config.codebook == "ema", ema_decay=config.ema_decay,
        dead_code_steps=config.dead_code_steps, data_variance=data_variance, seed=config.seed)
    # XLA stays off: it made the keras.io VQ-VAE ~3x slower on a 2-core CPU
    # (../shared/reference/measurements.md).
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=False)
    return model


def save_atomically(write, path):
    """write(tmp_path) then rename over `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name("tmp-" + path.name)
    write(str(tmp))
    os.replace(tmp, path)


def write_json(data, path):
    save_atomically(lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"), path)


class WallClock(keras.callbacks.Callback):
    """Adds epoch_seconds and elapsed_minutes to the logs, prints a one-line summary, and stops
    training when another epoch would overrun the time limit."""

    def __init__(self, epochs, limit_minutes, elapsed_before=0.0):
        super().__init__()
        self.epochs, self.limit, self.elapsed = epochs, (limit_minutes or 0) * 60, elapsed_before

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.time() - self.started
        self.elapsed += seconds
        logs.update(epoch_seconds=seconds, elapsed_minutes=self.elapsed / 60)
        print(f"epoch {epoch + 1}/{self.epochs}: val SSIM {logs['val_ssim']:.4f}, "
              f"PSNR {logs['val_psnr']:.2f} dB, perplexity {logs['val_perplexity']:.0f}, "
              f"codebook usage {logs['val_codebook_usage']:.0%}, {seconds:.0f} s "
              f"({self.elapsed / 60:.1f} min in all)", flush=True)
        if self.limit and self.elapsed + seconds > self.limit:
            print(f"another epoch would pass the time limit of {self.limit / 60:g} min: "
                  f"stopping.", flush=True)
            self.model.stop_training = True


class Checkpoints(keras.callbacks.Callback):
    """Saves last.keras every epoch and best.keras on a new best val_ssim, then state.json."""

    def __init__(self, out, state):
        super().__init__()
        self.out, self.state = Path(out), state

    def on_epoch_end(self, epoch, logs=None):
        save_atomically(self.model.save, self.out / "last.keras")
        if logs["val_ssim"] > self.state.get("best_val_ssim", -1.0):
            save_atomically(self.model.save, self.out / "best.keras")
            self.state.update(best_val_ssim=logs["val_ssim"], best_val_psnr=logs["val_psnr"],
                              best_epoch=epoch + 1)
        self.state.update(epochs_done=epoch + 1, elapsed_minutes=logs["elapsed_minutes"])
        write_json(self.state, self.out / "state.json")


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
    """Redraws the loss curves (linear and log scale) and the SSIM/PSNR curve from the CSV log
    after every epoch, so a killed run still has up-to-date plots."""

    def __init__(self, csv_path, out):
        super().__init__()
        self.csv_path, self.out = csv_path, Path(out)

    def on_epoch_end(self, epoch, logs=None):
        with open(self.csv_path) as f:
            rows = list(csv.DictReader(f))
        log = {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}
        epochs = log["epoch"] + 1
        for scale in ("linear", "log"):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for key, color in (("loss", "black"), ("reconstruction_loss", "tab:blue"),
                               ("vq_loss", "tab:orange")):
                ax.plot(epochs, log[key], color=color, label=f"train {key}")
                ax.plot(epochs, log["val_" + key], "--", color=color, label=f"validation {key}")
            ax.set(xlabel="epoch", ylabel="loss", yscale=scale, title=f"Losses ({scale} scale)")
            ax.legend(fontsize=8)
            self._save(fig, f"loss_curves_{scale}.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(epochs, log["val_ssim"], "o-", color="tab:blue")
        ax.set(xlabel="epoch", ylabel="mean SSIM (whole validation split)",
               title="Validation SSIM and PSNR")
        twin = ax.twinx()
        twin.plot(epochs, log["val_psnr"], "s--", color="tab:red")
        twin.set_ylabel("mean PSNR (dB)", color="tab:red")
        self._save(fig, "ssim_curve.png")

    def _save(self, fig, name):
        fig.tight_layout()
        save_atomically(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), self.out / name)
        plt.close(fig)


def main(argv=None):
    config, resume = parse_args(argv)
    try:
        train(config, resume)
    except dataset.DataError as error:
        sys.exit(f"error: {error}")


def train(config, resume):
    """The whole run: data, model, callbacks, fit; every output goes to config.out."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    precision = choose_precision(config.precision)
    keras.mixed_precision.set_global_policy(precision)
    state = json.loads((out / "state.json").read_text()) if resume else {}
    if resume and config.epochs <= state["epochs_done"]:
        sys.exit(f"error: {out} has done {state['epochs_done']} epochs already: pass --epochs "
                 f"larger than that to train more.")
    if not resume and (out / "state.json").exists():
        sys.exit(f"error: {out} already holds a training run: continue it with --resume, or "
                 f"give a new --out folder (or delete {out}) to start another.")
    # a resumed run reads the very folders it was trained on
    splits = (json.loads((out / "config.json").read_text())["splits"] if resume
              else resolve_splits(config))
    train_paths = dataset.list_images(splits["train"])
    val_paths = dataset.list_images(splits["validate"])
    if splits["test"]:
        dataset.list_images(splits["test"])
    print(f"data: {len(train_paths)} train slices in {splits['train']}, {len(val_paths)} "
          f"validation slices in {splits['validate']}; test: {splits['test']}")
    # a resumed run gets a new shuffle order, not a replay of the first epochs
    train_ds = dataset.load_split(train_paths, config.image_size, config.batch_size,
                                  shuffle=True, seed=config.seed + state.get("epochs_done", 0))
    val_ds = dataset.load_split(val_paths, config.image_size, config.batch_size)

    if resume:
        model = keras.models.load_model(out / "last.keras")
        print(f"resuming after epoch {state['epochs_done']} from {out / 'last.keras'}")
    else:
        variance = float(np.var(dataset.fixed_batch(train_paths, config.image_size, 256)))
        model = build_model(config, variance)
    write_json({"train": dataclasses.asdict(config), "precision": precision, "splits": splits,
                "model": model.get_config()}, out / "config.json")
    print("settings:", json.dumps({**dataclasses.asdict(config), "precision": precision}))
    print(f"model: {model.count_params():,} parameters, latent grid "
          f"{config.image_size // config.downsample}^2 x {config.code_dim}, "
          f"{config.codebook_size} codes")

    csv_path = out / "training_log.csv"
    callbacks = [
        WallClock(config.epochs, config.time_limit, state.get("elapsed_minutes", 0.0) * 60),
        keras.callbacks.CSVLogger(str(csv_path), append=resume),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        Checkpoints(out, state),
        ProgressGif(dataset.fixed_batch(val_paths, config.image_size, config.progress_images),
                    out),
        Plots(csv_path, out),
    ]
    started = time.time()
    # A progress bar in a terminal; one line per epoch when the output goes to a file.
    # shuffle=False: the training dataset shuffles itself.
    with dataset.naming_bad_files(train_paths + val_paths):
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                  initial_epoch=state.get("epochs_done", 0), callbacks=callbacks, shuffle=False,
                  verbose=1 if sys.stdout.isatty() else 2)
    summary = {**json.loads((out / "state.json").read_text()),
               "this_run_minutes": (time.time() - started) / 60, "precision": precision}
    write_json(summary, out / "train_summary.json")
    print("done:", json.dumps(summary))


if __name__ == "__main__":
    main()
