"""Train the VQ-VAE on OASIS brain slices (or the built-in demo set), then the PixelCNN prior
over its codes, and watch both learn.

    python train.py                                    # OASIS at data/, else the demo set
    python train.py --data path/to/keras_png_slices_data --epochs 30
    python train.py --train-dir ../shared/data/brain-slices/train \
                    --val-dir ../shared/data/brain-slices/validate --time-limit 30
    python train.py --resume                           # continue the run in --out
    python train.py --prior-only --out out             # a prior for a run that has none

Everything lands in --out (default out/): best.keras and last.keras (checkpoints, written
atomically), config.json (what predict.py reads), training_log.csv, tensorboard/, plots,
progress frames and progress.gif; for the prior prior_best.keras, prior_last.keras,
prior_training_log.csv and prior_bits_curve.png.
"""

import argparse
import math
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402
import metrics  # noqa: E402
import modules  # noqa: E402
from monitor import (Checkpoints, Plots, ProgressGif, WallClock, draw_vqvae_curves,  # noqa: E402
                     file_sha256, load_checkpoint, prior_curve_drawer, read_json, write_json)

DEMO_ROOT, OASIS_DEFAULT = Path("data/demo"), Path("data/keras_png_slices_data")
DEMO_MINUTES, DEMO_PRIOR_MINUTES = 5.0, 4.0  # the first `python train.py`: ~10 min, 2 cores
DEMO_DOWNSAMPLE = 8  # 32x32 code maps: a prior learns them in the demo's few minutes


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
    # stage two: the PixelCNN prior over code maps, trained after the VQ-VAE (0 epochs: none)
    prior_epochs: int = 20
    prior_batch_size: int = 32
    prior_learning_rate: float = 1e-3
    prior_time_limit: float | None = None  # minutes; 0 = no limit; None = unset
    prior_width: int = 64
    prior_layers: int = 12
    prior_kernel: int = 5


HELP = {
    "data": "OASIS root holding keras_png_slices_{train,validate,test}",
    "train_dir": "folder of training slices (PNG/JPEG); needs --val-dir",
    "val_dir": "folder of validation slices",
    "test_dir": "folder of test slices (optional; saved for predict.py)",
    "out": "output folder", "image_size": "images are fitted into this square (pixels)",
    "epochs": "epochs in all (a resumed run counts the epochs already done)",
    "batch_size": "images per training step", "learning_rate": "Adam learning rate",
    "time_limit": "stop when another epoch would pass this many minutes of training, resumed "
                  "parts included (0: no limit; unset: none, or 5 on the demo set)",
    "precision": "auto: mixed_bfloat16 where the hardware has fast bfloat16, else float32",
    "seed": "seed for weights, shuffling and the demo set",
    "downsample": "image-to-latent-grid factor (4: 64x64 codes at 256 px, 8: 32x32; the demo "
                  "set uses 8 unless given)",
    "width": "channels at the latent resolution (at least 8)",
    "res_blocks": "residual blocks at the latent resolution, in encoder and decoder",
    "code_dim": "code vector dimension D", "codebook_size": "number of codes K",
    "beta": "commitment cost",
    "codebook": "ema: exponential moving averages; loss: learned by the codebook loss",
    "ema_decay": "decay of the codebook moving averages",
    "dead_code_steps": "re-seed a code after this many training steps unused",
    "progress_images": "validation images shown in the progress GIF",
    "prior_epochs": "epochs of the PixelCNN prior after the VQ-VAE (0: no prior)",
    "prior_batch_size": "code maps per prior training step",
    "prior_learning_rate": "Adam learning rate of the prior",
    "prior_time_limit": "like --time-limit, for the prior (unset: none, or 4 on the demo set)",
    "prior_width": "channels of each prior stack", "prior_layers": "gated layers of the prior",
    "prior_kernel": "prior kernel size k (odd): each layer reaches k//2 rows further up",
}
RESUMABLE = ("epochs", "time_limit", "out", "prior_epochs", "prior_time_limit")
PRIOR_SETTINGS = tuple(name for name in HELP if name.startswith("prior_")) + ("out",)


def parse_args(argv=None):
    """(Config, mode) from the command line; mode says resume, prior_only and more_epochs.
    Flags default to None here so that the ones actually given can be told apart (a resumed
    or --prior-only run takes the rest from its config.json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        choices = {"precision": ["auto", "float32", "mixed_bfloat16"],
                   "codebook": ["ema", "loss"]}.get(field.name)
        kind = float if field.name.endswith("time_limit") else type(field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind,
                            choices=choices, help=f"{HELP[field.name]} (default: "
                                                  f"{field.default!r})")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out with its saved settings: the "
                             "VQ-VAE if it was cut short (or given more --epochs), else the prior")
    parser.add_argument("--prior-only", action="store_true",
                        help="train a new prior on the VQ-VAE saved in --out (its best.keras)")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("resume", "prior_only")}
    allowed = (RESUMABLE if args.resume else PRIOR_SETTINGS if args.prior_only else None)
    if args.resume and args.prior_only:
        parser.error("--resume and --prior-only do not go together: --resume continues a "
                     "prior that was cut short")
    if allowed is not None:
        if set(given) - set(allowed):
            flags = ", ".join("--" + name.replace("_", "-") for name in allowed)
            extra = ", ".join("--" + name.replace("_", "-")
                              for name in sorted(set(given) - set(allowed)))
            parser.error(f"{'--resume' if args.resume else '--prior-only'} keeps the saved "
                         f"settings: only {flags} may be given, not {extra}")
        flag = "--resume" if args.resume else "--prior-only"
        config = Config(**{**saved_settings(given.get("out", Config.out), flag), **given})
    else:
        config = Config(**given)
    check(config, parser)
    if args.prior_only and (Path(config.out) / "prior_state.json").exists():
        parser.error(f"{config.out} holds a prior already: continue it with --resume, or delete "
                     f"its prior_* files to train a new one")
    if args.prior_only and config.prior_epochs == 0:
        if "prior_epochs" in given:
            parser.error("--prior-only needs --prior-epochs of at least 1")
        config.prior_epochs = Config.prior_epochs  # the run was saved with its prior off
    # --epochs or --time-limit with --resume ask the VQ-VAE for more, even if it had finished
    mode = argparse.Namespace(resume=args.resume, prior_only=args.prior_only,
                              more_epochs=bool({"epochs", "time_limit"} & set(given)),
                              given=frozenset(given))
    return config, mode


def check(config, parser):
    """Refuse impossible settings before any work is done."""
    at_least_one = ("image_size", "epochs", "batch_size", "code_dim", "progress_images",
                    "dead_code_steps", "prior_batch_size", "prior_width", "prior_layers")
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
                "--prior-time-limit must be a number >= 0": config.prior_time_limit is not None
                and not 0 <= config.prior_time_limit < 1e9,
                "--prior-epochs cannot be negative": config.prior_epochs < 0,
                "--prior-learning-rate must be a positive number":
                not 0 < config.prior_learning_rate < 1e3,
                "--prior-kernel must be an odd number >= 3": config.prior_kernel < 3
                or config.prior_kernel % 2 == 0,
                f"--out {config.out} is, or is inside, a file, not a folder": any(
                    p.is_file() for p in (Path(config.out), *Path(config.out).parents)),
                "--image-size must be at least 16 (SSIM's 11-pixel window must fit)":
                config.image_size < 16,
                f"--downsample must be 2, 4, 8 or 16 and divide --image-size "
                f"({config.image_size})": config.downsample not in (2, 4, 8, 16)
                or config.image_size % config.downsample != 0}
    for message, failed in problems.items():
        if failed:
            parser.error(message)


def saved_settings(out, flag):
    """The settings saved by the run in `out` (for --resume and --prior-only)."""
    path = Path(out) / "config.json"
    model = "last.keras" if flag == "--resume" else "best.keras"
    for needed in (path, path.with_name(model), path.with_name("state.json")):
        if not needed.exists():
            sys.exit(f"error: {flag} needs {needed}, which does not exist: start a run with "
                     f"this --out first (or check --out).")
    return read_json(path)["train"]


def resolve_splits(config, given=()):
    """Absolute split folders {'train', 'validate', 'test'} (test may be None). With no data
    given it builds the demo set and, for the settings not in `given`, caps the demo run's
    time and uses --downsample 8, so that its prior can learn something in minutes."""
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
        if config.prior_time_limit is None:
            config.prior_time_limit = DEMO_PRIOR_MINUTES
        if "downsample" not in given and config.image_size % DEMO_DOWNSAMPLE == 0:
            config.downsample = DEMO_DOWNSAMPLE
        print(f"demo run: --downsample {config.downsample}; the VQ-VAE trains for about "
              f"{config.time_limit:g} minutes and the prior for about "
              f"{config.prior_time_limit:g} (0: no limit; set --downsample, --time-limit and "
              f"--prior-time-limit to change).", flush=True)
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


def build_prior(config, grid_size, codebook_size):
    """The one way train.py makes a fresh PixelCNN prior from a Config."""
    prior = modules.PixelCNNPrior(grid_size=grid_size, codebook_size=codebook_size,
                                  width=config.prior_width, layers=config.prior_layers,
                                  kernel_size=config.prior_kernel)
    prior.compile(optimizer=keras.optimizers.Adam(config.prior_learning_rate), jit_compile=False)
    return prior


def fit(model, train_ds, val_ds, epochs, state, callbacks, loss_name, rate_flag):
    """model.fit from the epoch after the ones in `state`; exits if a logged value became NaN
    or infinite, in training (TerminateOnNaN stops mid-epoch) or in validation (Checkpoints
    stops after the epoch); the checkpoints keep the epochs before. A progress bar in a
    terminal, one line per epoch when the output goes to a file. shuffle=False: the training
    datasets shuffle themselves."""
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                        initial_epoch=state.get("epochs_done", 0), callbacks=callbacks,
                        shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
    checkpoints = next(c for c in callbacks if isinstance(c, Checkpoints))
    finite_loss = np.isfinite(history.history[loss_name][-1])
    broken = checkpoints.not_finite or ([] if finite_loss else [loss_name])
    if broken:
        sys.exit(f"error: {', '.join(broken)} became NaN or infinite and training stopped; "
                 f"the checkpoints keep the epochs before. Try a lower {rate_flag} in a new "
                 f"run.")


def main(argv=None):
    config, mode = parse_args(argv)
    try:
        train(config, mode)
    except dataset.DataError as error:
        sys.exit(f"error: {error}")


def train(config, mode):
    """The whole run: the VQ-VAE (stage one), then its prior (stage two), in config.out."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    precision = choose_precision(config.precision)
    keras.mixed_precision.set_global_policy(precision)
    state = read_json(out / "state.json") if mode.resume or mode.prior_only else {}
    if not (mode.resume or mode.prior_only) and (out / "state.json").exists():
        sys.exit(f"error: {out} already holds a training run: continue it with --resume, or "
                 f"give a new --out folder (or delete {out}) to start another.")
    # a resumed run reads the very folders it was trained on
    splits = (read_json(out / "config.json")["splits"] if state
              else resolve_splits(config, mode.given))
    # --resume continues the VQ-VAE if it was cut short or given more epochs, else the prior
    vqvae_pending = not mode.prior_only and (not state or mode.more_epochs or (
        not state.get("finished") and state["epochs_done"] < config.epochs))
    if mode.prior_only and not state.get("finished"):
        state["finished"] = True  # a prior is built on it: --resume must not train it further
        write_json(state, out / "state.json")
    if not vqvae_pending and not config.prior_epochs:
        sys.exit(f"error: nothing to do: the VQ-VAE in {out} is trained and it has no prior. "
                 f"Pass --epochs larger than {state['epochs_done']} or --prior-epochs N.")
    if vqvae_pending:
        train_vqvae(config, out, splits, state, precision)
    if config.prior_epochs:
        train_prior(config, out, splits, resume=mode.resume and not vqvae_pending)


def train_vqvae(config, out, splits, state, precision):
    """Stage one: fit the VQ-VAE; best.keras, last.keras, state.json, logs and plots."""
    resume = bool(state)
    state.pop("finished", None)  # set again only when this fit ends well
    if resume and config.epochs <= state["epochs_done"]:
        sys.exit(f"error: {out} has done {state['epochs_done']} epochs already: pass --epochs "
                 f"larger than that to train more.")
    # a prior learned the codes of the old VQ-VAE: forget it, so that a run killed before the
    # new prior's first epoch resumes into a fresh prior rather than a stale one
    (out / "prior_state.json").unlink(missing_ok=True)
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
        model = load_checkpoint(out / "last.keras")
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
    describe = (lambda logs: f"val SSIM {logs['val_ssim']:.4f}, PSNR {logs['val_psnr']:.2f} dB, "
                f"perplexity {logs['val_perplexity']:.0f}, codebook usage "
                f"{logs['val_codebook_usage']:.0%}")
    callbacks = [
        WallClock(config.epochs, config.time_limit, state.get("elapsed_minutes", 0.0) * 60,
                  describe),
        keras.callbacks.CSVLogger(str(csv_path), append=resume),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        Checkpoints(out, state),
        ProgressGif(dataset.fixed_batch(val_paths, config.image_size, config.progress_images),
                    out),
        Plots(csv_path, out, draw_vqvae_curves),
    ]
    started = time.time()
    with dataset.naming_bad_files(train_paths + val_paths):
        fit(model, train_ds, val_ds, config.epochs, state, callbacks, "loss", "--learning-rate")
    state["finished"] = True  # all epochs done, or the time limit reached
    write_json(state, out / "state.json")
    summary = {**state, "this_run_minutes": (time.time() - started) / 60, "precision": precision}
    write_json(summary, out / "train_summary.json")
    print("done:", json.dumps(summary))


def train_prior(config, out, splits, resume):
    """Stage two: encode the train and validation splits once with best.keras, then fit the
    PixelCNN prior on the code maps; prior_best.keras, prior_last.keras, prior_state.json."""
    vqvae_path = out / "best.keras"
    state_path = out / "prior_state.json"
    fingerprint = file_sha256(vqvae_path)
    resume = resume and state_path.exists()
    state = read_json(state_path) if resume else {"vqvae_sha256": fingerprint}
    if state["vqvae_sha256"] != fingerprint:
        sys.exit(f"error: {vqvae_path} changed after the prior in {out} was trained on it: "
                 f"train a new prior with --prior-only (delete {state_path} first).")
    if resume and config.prior_epochs <= state["epochs_done"]:
        sys.exit(f"error: the prior in {out} has done {state['epochs_done']} epochs already: "
                 f"pass --prior-epochs larger than that to train it more.")
    started = time.time()
    vqvae = load_checkpoint(vqvae_path)
    codes = {}
    for split in ("train", "validate"):
        paths = dataset.list_images(splits[split])
        with dataset.naming_bad_files(paths):
            codes[split] = vqvae.encode_all(dataset.load_split(paths, config.image_size, 64))
    grid, K = codes["train"].shape[1], vqvae.codebook_size
    print(f"prior: encoded {len(codes['train'])} train and {len(codes['validate'])} validation "
          f"slices into {grid}x{grid} code maps with {vqvae_path} "
          f"({time.time() - started:.0f} s)", flush=True)
    baselines = {"uniform": math.log2(K),
                 "unigram": metrics.unigram_bits(codes["train"], codes["validate"], K),
                 "per-position unigram": metrics.position_unigram_bits(
                     codes["train"], codes["validate"], K)}
    prior = (load_checkpoint(out / "prior_last.keras") if resume
             else build_prior(config, grid, K))
    saved = read_json(out / "config.json")
    write_json({**saved, "train": dataclasses.asdict(config), "prior": prior.get_config()},
               out / "config.json")
    print(f"prior: {prior.count_params():,} parameters; validation baselines in bits per code: "
          + ", ".join(f"{name} {bits:.3f}" for name, bits in baselines.items()), flush=True)

    train_ds = (tf.data.Dataset.from_tensor_slices(codes["train"])
                .shuffle(len(codes["train"]), seed=config.seed + state.get("epochs_done", 0))
                .batch(config.prior_batch_size).prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices(codes["validate"]).batch(config.prior_batch_size)
    csv_path = out / "prior_training_log.csv"
    describe = (lambda logs: f"bits per code: train {logs['bits_per_code']:.3f}, validation "
                f"{logs['val_bits_per_code']:.3f}")
    callbacks = [
        WallClock(config.prior_epochs, config.prior_time_limit,
                  state.get("elapsed_minutes", 0.0) * 60, describe, name="prior "),
        keras.callbacks.CSVLogger(str(csv_path), append=resume),
        keras.callbacks.TensorBoard(str(out / "tensorboard" / "prior"), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        Checkpoints(out, state, "prior_", "val_bits_per_code", higher_is_better=False),
        Plots(csv_path, out, prior_curve_drawer(baselines)),
    ]
    fit(prior, train_ds, val_ds, config.prior_epochs, state, callbacks, "bits_per_code",
        "--prior-learning-rate")
    summary = {**state, "baselines_bits_per_code": baselines,
               "this_run_minutes": (time.time() - started) / 60}
    write_json(summary, out / "prior_summary.json")
    print("prior done:", json.dumps(summary))


if __name__ == "__main__":
    main()
