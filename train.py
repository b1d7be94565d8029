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

import dataclasses
import math
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402
import distribute  # noqa: E402
import metrics  # noqa: E402
import modules  # noqa: E402
from prior import PixelCNNPrior  # noqa: E402
from monitor import (Checkpoints, Interrupted, Plots, ProgressGif, StopOnSignal,  # noqa: E402
                     WallClock, catching_stop_signals, crash_point, draw_vqvae_curves,
                     holding_run_lock, settle_after_stop,
                     file_sha256, load_checkpoint, prior_curve_drawer, read_json,
                     remove_leftovers, rewind_vqvae_outputs, stop_signal_received, trim_log,
                     write_json)
from settings import parse_args, read_run_config  # noqa: E402

DEMO_ROOT, OASIS_DEFAULT = Path("data/demo"), Path("data/keras_png_slices_data")
# The first `python train.py` (no data): 9-10 minutes on 2 cores, sized to the precision.
# demo: caps on its two stages (for any --purpose) and its model (--purpose generate only).
# Where bfloat16 runs (AVX512_BF16 or AMX CPUs, GPUs): 32x32 code maps from a narrower first
# stage, and a narrower prior (width 32: 3x faster per map) of 12 layers, as measured for the
# README's demo, so that the prior learns slices, not blobs, in its 4 minutes.
DEMO = {"caps": {"time_limit": 5.0, "prior_time_limit": 4.0},
        "model": {"width": 64, "res_blocks": 1, "prior_width": 32, "prior_layers": 12}}
# In float32 (a CPU without bfloat16, e.g. AVX2 only) every step is ~5x slower, and the demo
# above draws blobs: it trains 128-px slices into 16x16 code maps of 8x8 pixels instead (a VQ-VAE
# epoch of ~20 s, a prior epoch of ~19 s), 12 epochs each. On 32x32 maps (--downsample 4) the
# prior's 4 affordable epochs drew streaky shapes with no anatomy; on 16x16 its 12 layers see the
# whole map above a code and it learns midlines and whole slice levels, blurred by the coarser
# codes. Caps in epochs, not minutes, so that every CPU trains the same amount (on a noisy
# 2-core host, minute caps cut the 32x32 first stage at 5 epochs, before its codebook spread).
DEMO_FLOAT32 = {"caps": {"epochs": 12, "prior_epochs": 12},
                "model": {"image_size": 128, "downsample": 8, **DEMO["model"]}}
GRID = ("image_size", "downsample")  # set together: a given one keeps the other's default
# On real data in float32: the settings of the README's 128-px runs (19 + 39 minutes of training)
FLOAT32_RECIPE = ("--image-size 128 --downsample 8 --width 64 --res-blocks 1 --prior-dropout 0.1 "
                  "--epochs 200 --time-limit 20 --prior-epochs 200 --prior-time-limit 40")


def resolve_splits(config, precision, given=()):
    """Absolute split folders {'train', 'validate', 'test'} (test may be None). With no data
    given it builds the demo set and, for the settings not in `given`, caps the demo run and
    (for --purpose generate) sizes its model for `precision` (DEMO, DEMO_FLOAT32), so that
    its prior learns in minutes."""
    if config.train_dir or config.val_dir:
        if not (config.train_dir and config.val_dir):
            sys.exit("error: --train-dir and --val-dir go together: give both.")
        suggest_float32_recipe(config, precision, given)
        return {"train": str(Path(config.train_dir).resolve()),
                "validate": str(Path(config.val_dir).resolve()),
                "test": str(Path(config.test_dir).resolve()) if config.test_dir else None}
    root = config.data or (OASIS_DEFAULT if OASIS_DEFAULT.is_dir() else None)
    if root is None:
        root = demo_root(config.seed)
        size_demo(config, precision, given)
    else:
        suggest_float32_recipe(config, precision, given)
    dirs = dataset.oasis_split_dirs(root, need_test=False)  # training can go without a test set
    return {split: str(path.resolve()) if path else None for split, path in dirs.items()}


def suggest_float32_recipe(config, precision, given):
    """On real data, where `--precision auto` found no bfloat16 on a CPU, say that the default
    generating model trains ~5x slower here, and give the recipe measured for such a CPU. It
    only says so: the slice size is the user's to choose, and a run keeps the size it started
    with."""
    on_a_cpu = config.precision == "auto" and not tf.config.list_physical_devices("GPU")
    if precision == "float32" and on_a_cpu and config.purpose == "generate" and not any(
            name in given for name in GRID):
        print(f"note: no bfloat16 on this CPU, so float32: a step is ~5x slower, and in the same "
              f"minutes the default {config.image_size}-px model trains a fifth as far. Measured "
              f"for such a CPU (README: 'On a CPU without bfloat16: 128-px slices'), 16x16 code "
              f"maps that generate recognisable slices in about an hour: {FLOAT32_RECIPE}",
              flush=True)


def size_demo(config, precision, given):
    """Cap the demo run and size its model for `precision`, where flags leave it. The float32
    demo's epoch caps were measured for its own model only: with another purpose or a grid
    given, the minute caps of DEMO hold instead."""
    generate = config.purpose == "generate"
    small = precision == "float32" and generate and not any(name in given for name in GRID)
    demo = DEMO_FLOAT32 if small else DEMO  # only DEMO_FLOAT32 sets the grid, and as a pair
    for name, value in {**demo["caps"], **(demo["model"] if generate else {})}.items():
        if name not in given:
            setattr(config, name, value)
    flags = " ".join(f"--{name.replace('_', '-')} {getattr(config, name)}"
                     for name in ("purpose", *GRID, *DEMO["model"]))
    speed = (" (float32 here: a step is ~5x slower than with bfloat16, so a smaller demo of "
             "about 10 minutes on 2 cores; README: 'The demo on a CPU without bfloat16')"
             if small else "")
    caps = DEMO["caps"]
    pair = (f"; with --image-size or --downsample given: the {caps['time_limit']:g} and "
            f"{caps['prior_time_limit']:g} minute caps instead" if small else "")

    def length(epochs, minutes):
        return f"{epochs} epochs" + (f" or about {minutes:g} minutes, whichever ends first"
                                     if minutes else "")
    prior = (f"the prior {length(config.prior_epochs, config.prior_time_limit)}"
             if config.prior_epochs else "no prior (--prior-epochs 0)")
    print(f"demo run{speed}: {flags}; the VQ-VAE trains {length(config.epochs, config.time_limit)}"
          f"; {prior} (set these flags, --epochs, --time-limit, --prior-epochs and "
          f"--prior-time-limit to change; a time limit of 0: none{pair}).", flush=True)


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


def pixel_variance(paths, folder, config):
    """The variance of training pixels (from up to 256 slices spread over the split), which
    scales the reconstruction loss; zero would divide by zero, and means no data to learn."""
    variance = float(np.var(dataset.fixed_batch(paths, config.image_size, 256)))
    if not variance > 0:
        raise dataset.DataError(
            f"the training slices in {folder} are blank: every pixel has the same value (zero "
            f"variance), so there is nothing to learn. Check that the folder holds the MRI "
            f"slices (not masks or empty exports) and that they are not all black.")
    return variance


def choose_precision(choice):
    """The Keras dtype policy for --precision: `auto` picks the fastest that keeps training
    stable. GPUs: bfloat16 from compute capability 8 (Ampere) on; float16 tensor cores from 7,
    where float16's narrow range needs loss scaling (compile wraps the optimizer in a
    LossScaleOptimizer under mixed_float16, and the train steps scale their loss); float32
    below. CPUs: bfloat16 where the instructions exist (AVX512_BF16 or AMX)."""
    if choice != "auto":
        return choice
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability",
                                                                       (0, 0))[0]
        return ("mixed_bfloat16" if major >= 8 else "mixed_float16" if major >= 7
                else "float32")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def use_xla(choice):
    """--jit-compile -> compile's jit_compile. `auto` is off everywhere: XLA made the keras.io
    VQ-VAE ~3x slower on a 2-core CPU (../shared/reference/measurements.md; bench.py measures
    it again), and it has not been measured on a GPU, so it stays off there until bench.py
    shows it faster."""
    return choice == "on"


def build_model(config, data_variance):
    """The one way train.py makes a fresh VQ-VAE from a Config."""
    model = modules.VQVAE(
        image_size=config.image_size, downsample=config.downsample, width=config.width,
        res_blocks=config.res_blocks, code_dim=config.code_dim,
        codebook_size=config.codebook_size, beta=config.beta,
        use_ema=config.codebook == "ema", ema_decay=config.ema_decay,
        dead_code_steps=config.dead_code_steps, data_variance=data_variance, seed=config.seed,
        subpixel=config.decoder_output == "subpixel")
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  jit_compile=use_xla(config.jit_compile))
    return model


def build_prior(config, grid_size, codebook_size):
    """The one way train.py makes a fresh PixelCNN prior from a Config."""
    prior = PixelCNNPrior(grid_size=grid_size, codebook_size=codebook_size,
                          width=config.prior_width, layers=config.prior_layers,
                          kernel_size=config.prior_kernel, dropout=config.prior_dropout)
    prior.compile(optimizer=keras.optimizers.Adam(config.prior_learning_rate),
                  jit_compile=use_xla(config.jit_compile))
    return prior


def fit(model, train_ds, val_ds, epochs, state, callbacks, loss_name, rate_flag, steps=None):
    """model.fit from the epoch after the ones in `state` (`steps` per epoch where
    distribute.batches gives them); exits if a logged value became NaN
    or infinite, in training (TerminateOnNaN stops mid-epoch) or in validation (Checkpoints
    stops after the epoch); the checkpoints keep the epochs before. A progress bar in a
    terminal, one line per epoch when the output goes to a file. shuffle=False: the training
    datasets shuffle themselves."""
    history = model.fit(train_ds, steps_per_epoch=steps, validation_data=val_ds,
                        epochs=epochs, initial_epoch=state.get("epochs_done", 0),
                        callbacks=callbacks, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)
    checkpoints = next(c for c in callbacks if isinstance(c, Checkpoints))
    finite_loss = np.isfinite(history.history[loss_name][-1])
    broken = checkpoints.not_finite or ([] if finite_loss else [loss_name])
    if broken:
        sys.exit(f"error: {', '.join(broken)} became NaN or infinite and training stopped; "
                 f"the checkpoints keep the epochs before. Try a lower {rate_flag} in a new "
                 f"run.")


def main(argv=None):
    worker = distribute.this_worker()  # from TF_CONFIG: one chief when there is none
    config, mode = parse_args(argv, chief=worker.chief)
    strategy = distribute.choose_strategy(config.strategy, worker)  # before any TF work
    distribute.check_batch_sizes(strategy, {"--batch-size": config.batch_size} | (
        {"--prior-batch-size": config.prior_batch_size} if config.prior_epochs else {}))
    continuing, run_out = mode.resume or mode.prior_only, config.out
    if worker.count > 1 and not continuing and not (config.data or config.train_dir
                                                    or OASIS_DEFAULT.is_dir()):
        sys.exit("error: a cluster trains on real data that every worker sees (--data, or "
                 "--train-dir and --val-dir, on a shared file system); the demo set is not "
                 "built for several machines.")
    with distribute.writable_out(run_out, worker, strategy, continuing) as config.out, \
            holding_run_lock(config.out), catching_stop_signals():
        try:
            train(config, mode, strategy)
        except dataset.DataError as error:
            sys.exit(f"error: {error}")
        except (Interrupted, KeyboardInterrupt) as stop:  # a signal, or a second one at once
            stopped = settle_after_stop(config.out, stop)
            sys.exit(f"stopped by {stopped}: {saved_epochs(Path(run_out))}; "
                     f"the epoch in progress was dropped. Resume with:\n"
                     f"  python train.py --resume --out {shlex.quote(run_out)}")


def saved_epochs(out):
    """'3 epochs of the VQ-VAE and 1 of the prior are saved in out' (what --resume has)."""
    done = [read_json(out / f"{prefix}state.json")["epochs_done"]
            if (out / f"{prefix}state.json").exists() else 0 for prefix in ("", "prior_")]
    prior = f" and {done[1]} of the prior" if done[1] else ""
    return f"{done[0]} epochs of the VQ-VAE{prior} are saved in {out}"


def train(config, mode, strategy=None):
    """The whole run: the VQ-VAE (stage one), then its prior (stage two), in config.out, under
    a tf.distribute strategy (one device by default)."""
    strategy = strategy or tf.distribute.get_strategy()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    precision = choose_precision(config.precision)
    keras.mixed_precision.set_global_policy(precision)
    remove_leftovers(out)  # what a killed run was writing: finished if committed, else deleted
    continuing = mode.resume or mode.prior_only
    state = read_json(out / "state.json") if (out / "state.json").exists() else {}
    if not continuing:
        distribute.refuse_a_second_run(out)
    if not state and (out / "last.keras").exists():
        sys.exit(f"error: {out} holds last.keras but not its state.json (deleted or lost?): "
                 f"restore {out / 'state.json'}, or start a new run in another --out.")
    done = state.get("epochs_done", 0)
    if "epochs" in mode.given and continuing and config.epochs < done:
        sys.exit(f"error: {out} has done {done} epochs already: pass --epochs larger than that "
                 f"to train more.")
    rewind_vqvae_outputs(out, done)  # drop what a killed run logged of an unsaved epoch
    # a resumed run reads the very folders it was trained on
    splits = (read_run_config(out / "config.json")["splits"] if continuing
              else resolve_splits(config, precision, mode.given))
    if not continuing and config.prior_epochs:  # the demo may have changed the prior's batch
        distribute.check_batch_sizes(strategy, {"--prior-batch-size": config.prior_batch_size})
    # the VQ-VAE trains if it is new, cut short, or asked for more epochs or time
    more_asked = "epochs" in mode.given or ("time_limit" in mode.given
                                            and not time_is_up(config.time_limit, state))
    vqvae_pending = not mode.prior_only and (not state or (
        done < config.epochs and (not state.get("finished") or more_asked)))
    if not vqvae_pending and not state.get("finished"):
        state["finished"] = True  # all its epochs are done, or a prior is built on it
        write_json(state, out / "state.json")
    if vqvae_pending:
        train_vqvae(config, out, splits, state, precision, strategy)
    prior_trained = config.prior_epochs and train_prior(config, out, splits, continuing,
                                                        mode.given, strategy)
    if not (vqvae_pending or prior_trained):
        prior = " and so is its prior" if config.prior_epochs else " and it has no prior"
        sys.exit(f"error: nothing to do: the VQ-VAE in {out} is trained ({done} epochs){prior}. "
                 f"Pass a larger --epochs or --prior-epochs (or time limit) to train more.")


def save_run_config(out, config, fresh=False, **entries):
    """config.json: the run's settings (`config`) and the given entries, over what it held
    before unless `fresh` (a new run starts it over)."""
    saved = {} if fresh else read_run_config(out / "config.json")
    write_json({**saved, **entries, "train": dataclasses.asdict(config)}, out / "config.json")


def time_is_up(limit_minutes, state):
    """True if the time limit would be passed by another epoch as long as the last one (the
    rule WallClock applies after each epoch, applied again when a run is resumed)."""
    seconds = state.get("elapsed_minutes", 0.0) * 60 + state.get("epoch_seconds", 0.0)
    return bool(limit_minutes) and bool(state) and seconds > limit_minutes * 60


def train_vqvae(config, out, splits, state, precision, strategy):
    """Stage one: fit the VQ-VAE; best.keras, last.keras, state.json, logs and plots."""
    resume = bool(state)
    if resume and config.epochs <= state["epochs_done"]:
        sys.exit(f"error: {out} has done {state['epochs_done']} epochs already: pass --epochs "
                 f"larger than that to train more.")
    if resume:  # on disk at once, so that a kill now resumes this stage with these settings
        state.pop("finished", None)
        write_json(state, out / "state.json")
        save_run_config(out, config)
    skipped = []
    train_paths, val_paths = (
        dataset.list_images_skipping(splits[name], config.skip_bad_files, skipped)
        for name in ("train", "validate"))
    if splits["test"]:
        dataset.list_images_skipping(splits["test"], config.skip_bad_files, skipped)
    print(f"data: {len(train_paths)} train slices in {splits['train']}, {len(val_paths)} "
          f"validation slices in {splits['validate']}; test: {splits['test']}")
    # a resumed run gets a new shuffle order, not a replay of the first epochs
    seed = config.seed + state.get("epochs_done", 0)
    train_ds, steps = distribute.batches(
        strategy, train_paths, config.batch_size, training=True,
        make=lambda paths, batch, whole: dataset.load_split(
            paths, config.image_size, batch, shuffle=True, seed=seed, drop_remainder=whole))
    val_ds, _ = distribute.batches(
        strategy, val_paths, config.batch_size,
        make=lambda paths, batch, _: dataset.load_split(paths, config.image_size, batch))

    with strategy.scope():  # the model, its optimizer and metrics live on every replica
        if resume:
            model = load_checkpoint(out / "last.keras", modules.VQVAE)
            model.jit_compile = use_xla(config.jit_compile)  # the file has the saved run's
            print(f"resuming after epoch {state['epochs_done']} from {out / 'last.keras'}")
        else:
            model = build_model(config, pixel_variance(train_paths, splits["train"], config))
    save_run_config(out, config, fresh=not resume, precision=precision, splits=splits,
                    model=model.get_config(), skipped_files=skipped)
    print("settings:", json.dumps({**dataclasses.asdict(config), "precision": precision}))
    print(f"model: {model.count_params():,} parameters, latent grid "
          f"{config.image_size // config.downsample}^2 x {config.code_dim}, "
          f"{config.codebook_size} codes")

    csv_path = out / "training_log.csv"
    describe = (lambda logs: f"val SSIM {logs['val_ssim']:.4f}, PSNR {logs['val_psnr']:.2f} dB, "
                f"perplexity {logs['val_perplexity']:.0f}, codebook usage "
                f"{logs['val_codebook_usage']:.0%}")
    gif_images = dataset.fixed_batch(val_paths, config.image_size, config.progress_images)
    # every worker of a cluster runs every callback (ProgressGif's predict is a collective)
    callbacks = [  # in this order: the epoch's log, frame and plots, then its checkpoints
        WallClock(config.epochs, config.time_limit, state.get("elapsed_minutes", 0.0) * 60,
                  describe),
        keras.callbacks.CSVLogger(str(csv_path), append=resume),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        ProgressGif(gif_images, out),
        Plots(csv_path, out, draw_vqvae_curves),
        Checkpoints(out, state, log=csv_path),
        StopOnSignal(distribute.stop_agreement(strategy)),
    ]
    started = time.time()
    if time_is_up(config.time_limit, state):
        print(f"the time limit of {config.time_limit:g} min is used up: no more VQ-VAE epochs.")
    else:
        with dataset.naming_bad_files(train_paths + val_paths):
            fit(model, train_ds, val_ds, config.epochs, state, callbacks, "loss",
                "--learning-rate", steps)
    state["finished"] = True  # all epochs done, or the time limit reached
    write_json(state, out / "state.json")
    summary = {**state, "this_run_minutes": (time.time() - started) / 60, "precision": precision}
    write_json(summary, out / "train_summary.json")
    print("done:", json.dumps(summary))


def prior_state_for(config, out, resume, given):
    """The saved prior's state to continue, a fresh one, or None if the saved prior is complete.

    A prior learned the codes of one best.keras (its SHA-256 is in prior_state.json). If
    train.py has since trained the VQ-VAE further (state.json records the SHA-256 of each
    best.keras it saves), the prior is replaced; if best.keras changed any other way, the run
    is refused rather than pairing a prior with codes it never saw.
    """
    vqvae_path, state_path = out / "best.keras", out / "prior_state.json"
    fingerprint = file_sha256(vqvae_path)
    state = read_json(state_path) if resume and state_path.exists() else {}
    if state and state["vqvae_sha256"] != fingerprint:
        if read_json(out / "state.json").get("best_sha256") != fingerprint:
            sys.exit(f"error: {vqvae_path} changed after the prior in {out} was trained on it, "
                     f"and not by train.py: restore it, or delete {state_path} and run python "
                     f"train.py --resume --out {out} to train a new prior on it.")
        print("prior: the VQ-VAE has trained further since its prior: training a new prior.")
        state_path.unlink()
        state = {}
    if not state:
        return {"vqvae_sha256": fingerprint}
    done = state["epochs_done"]
    if "prior_epochs" in given and config.prior_epochs < done:
        sys.exit(f"error: the prior in {out} has done {done} epochs already: pass "
                 f"--prior-epochs larger than that to train it more.")
    more_asked = "prior_epochs" in given or ("prior_time_limit" in given and not time_is_up(
        config.prior_time_limit, state))
    if done >= config.prior_epochs or (state.get("finished") and not more_asked):
        print(f"prior: complete ({done} epochs).")
        return None
    if state.pop("finished", None):  # on disk at once: a kill now must resume the prior
        write_json(state, state_path)
    return state


def train_prior(config, out, splits, resume, given=frozenset(), strategy=None):
    """Stage two: encode the train and validation splits once with best.keras, then fit the
    PixelCNN prior on the code maps; prior_best.keras, prior_last.keras, prior_state.json.
    Returns False if there was nothing to train."""
    started = time.time()
    vqvae = load_checkpoint(out / "best.keras", modules.VQVAE)
    state = prior_state_for(config, out, resume, given)
    if state is None:
        return False
    resume = "epochs_done" in state
    grid, K = config.image_size // config.downsample, vqvae.codebook_size
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        prior = (load_checkpoint(out / "prior_last.keras", PixelCNNPrior) if resume
                 else build_prior(config, grid, K))
    prior.jit_compile = use_xla(config.jit_compile)  # a resumed one has its saved run's
    skipped, codes = [], {}
    save_run_config(out, config, prior=prior.get_config())  # a kill while encoding keeps them
    for split in ("train", "validate"):
        paths = dataset.list_images_skipping(splits[split], config.skip_bad_files,
                                             skipped)
        with dataset.naming_bad_files(paths):
            codes[split] = vqvae.encode_all(dataset.load_split(paths, config.image_size, 64))
        crash_point("prior encoded " + split)
        # encoding takes minutes: do not wait for the first batch (on a cluster: all together)
        if distribute.all_workers_agree(strategy, bool(stop_signal_received())):
            raise Interrupted(stop_signal_received() or "a signal to another worker")
    if skipped:
        known = read_run_config(out / "config.json").get("skipped_files", [])
        save_run_config(out, config, skipped_files=sorted(set(known + skipped)))
    print(f"prior: encoded {len(codes['train'])} train and {len(codes['validate'])} validation "
          f"slices into {grid}x{grid} code maps with {out / 'best.keras'} "
          f"({time.time() - started:.0f} s)", flush=True)
    baselines = {"uniform": math.log2(K),
                 "unigram": metrics.unigram_bits(codes["train"], codes["validate"], K),
                 "per-position unigram": metrics.position_unigram_bits(
                     codes["train"], codes["validate"], K)}
    print(f"prior: {prior.count_params():,} parameters; validation baselines in bits per code: "
          + ", ".join(f"{name} {bits:.3f}" for name, bits in baselines.items()), flush=True)

    seed = config.seed + state.get("epochs_done", 0)
    train_ds, steps = distribute.batches(
        strategy, codes["train"], config.prior_batch_size, training=True,
        make=lambda maps, batch, whole: tf.data.Dataset.from_tensor_slices(maps).shuffle(
            len(maps), seed=seed).batch(batch, whole).prefetch(tf.data.AUTOTUNE))
    val_ds, _ = distribute.batches(strategy, codes["validate"], config.prior_batch_size,
                                   make=lambda maps, batch, _: tf.data.Dataset
                                   .from_tensor_slices(maps).batch(batch))
    csv_path = out / "prior_training_log.csv"
    describe = (lambda logs: f"bits per code: train {logs['bits_per_code']:.3f}, validation "
                f"{logs['val_bits_per_code']:.3f}")
    trim_log(csv_path, state.get("epochs_done", 0))
    callbacks = [  # in this order: the epoch's log and plot, then its checkpoints
        WallClock(config.prior_epochs, config.prior_time_limit,
                  state.get("elapsed_minutes", 0.0) * 60, describe, name="prior "),
        keras.callbacks.CSVLogger(str(csv_path), append=resume),
        keras.callbacks.TensorBoard(str(out / "tensorboard" / "prior"), profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        Plots(csv_path, out, prior_curve_drawer(baselines)),
        Checkpoints(out, state, "prior_", "val_bits_per_code", higher_is_better=False,
                    log=csv_path),
        StopOnSignal(distribute.stop_agreement(strategy)),
    ]
    if time_is_up(config.prior_time_limit, state):
        print(f"the prior's time limit of {config.prior_time_limit:g} min is used up.")
    else:
        fit(prior, train_ds, val_ds, config.prior_epochs, state, callbacks, "bits_per_code",
            "--prior-learning-rate", steps)
    state["finished"] = True  # all epochs done, or the time limit reached
    write_json(state, out / "prior_state.json")
    summary = {**state, "baselines_bits_per_code": baselines,
               "this_run_minutes": (time.time() - started) / 60}
    write_json(summary, out / "prior_summary.json")
    print("prior done:", json.dumps(summary))
    return True


if __name__ == "__main__":
    main()
