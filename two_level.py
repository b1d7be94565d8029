"""The two-level code of VQ-VAE-2 (vqvae2.py), trained and measured against the one-level
pipeline: the first stage (TwoLevelVQVAE), then a top prior that draws the top maps (in a
style class drawn first: --style-bins), then a bottom prior conditioned on them.

    python two_level.py --train-dir ../shared/data/brain-slices/train \\
        --val-dir ../shared/data/brain-slices/validate --out out/two_level
    python two_level.py --data ROOT --out out/two_level     # an OASIS folder, as train.py's

trains the three stages one after the other, each to its time limit (--minutes, 40 30 20
by default: 90 in all; by --schedule cosine its learning rate falls to 0 at that limit; a
stage already finished in --out is loaded, one cut short resumes, and
one given --minutes above those it used trains on; Ctrl-C or SIGTERM stops at the next batch,
and the same command resumes; one run at a time trains in an --out),
then draws --generate slices (the top maps cooler than the bottom: --temperature) and
measures them into generate/generation_report.json by `predict.py --generate`, which reads the
run from --out (run.json) as it reads a train.py run:

    python predict.py --checkpoint out/two_level              # reconstructions of the test split
    python predict.py --checkpoint out/two_level --generate 16
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402
import metrics  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from monitor import (Checkpoints, CosineOverTime, Interrupted, StopOnSignal,  # noqa: E402
                     WallClock, catching_stop_signals, file_sha256, holding_run_lock,
                     load_checkpoint, read_json, remove_leftovers, settle_after_stop,
                     stop_signal_received, trim_log, write_json)
from prior import PixelCNNPrior  # noqa: E402
import vqvae2  # noqa: E402
from vqvae2 import StyleClasses, TwoLevelVQVAE  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="", help="instead of the three folders below: an "
                        "OASIS folder, keras_png_slices_data or the folder that holds it (as "
                        "train.py's --data), for its train, validate and (if there) test splits")
    parser.add_argument("--train-dir", default="", help="folder of training slices")
    parser.add_argument("--val-dir", default="", help="folder of validation slices")
    parser.add_argument("--test-dir", default="", help="slices the samples are measured "
                        "against (default: --data's test split, else --val-dir)")
    parser.add_argument("--out", default="out/two_level", help="output folder")
    parser.add_argument("--minutes", type=float, nargs=3, metavar=("FIRST", "TOP", "BOTTOM"),
                        default=argparse.SUPPRESS,  # so that parse_args knows if given
                        help=f"time limits of the first stage, the top prior and the bottom "
                             f"prior (as train.py's --time-limit, 0: none; default "
                             f"{' '.join(map(str, MINUTES))}); given, a finished stage with "
                             f"room for another epoch under its limit trains on")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--code-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=512, help="K of each level")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prior-batch-size", type=int, default=8)
    parser.add_argument("--top-prior", type=int, nargs=3, default=[64, 8, 5],
                        metavar=("WIDTH", "LAYERS", "KERNEL"), help="the top prior's size")
    parser.add_argument("--bottom-prior", type=int, nargs=3, default=[32, 8, 5],
                        metavar=("WIDTH", "LAYERS", "KERNEL"),
                        help="the bottom prior's size: 4x the positions of the top map, so "
                             "narrower; it knows the layout from the top map. 32 8 5 sees 17 "
                             "rows up and drew more varied samples than 32 6 3 (7 rows) on two "
                             "bf16 runs' first stages (README, \"a bottom prior that sees "
                             "further\" and \"the new default from scratch\"); a run folder "
                             "made before this default keeps 32 6 3 in its args.json: pass "
                             "--bottom-prior 32 6 3 to reuse it")
    parser.add_argument("--prior-dropout", type=float, nargs=2, default=[0.0, 0.0],
                        metavar=("TOP", "BOTTOM"), help="dropout rate in each prior's gated "
                        "layers while it trains (as train.py's --prior-dropout; 0: none)")
    parser.add_argument("--style-bins", type=int, default=STYLE_BINS,
                        help="condition the top prior on each slice's style: which of N "
                             "quantile bins of brightness and N of contrast its brain falls "
                             "in (N^2 classes, drawn with their training frequencies before "
                             "each sample; 0: none, as the runs before the flag)")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help=f"each stage's learning rate ({LEARNING_RATE:g} at the start): "
                             f"cosine anneals it to 0 over the stage's --minutes (a stage "
                             f"without a limit keeps it constant); constant keeps it (the "
                             f"runs before the schedule)")
    parser.add_argument("--generate", type=int, default=256,
                        help="slices to draw and measure (0: none, else at least 2)")
    parser.add_argument("--temperature", type=float, nargs="+",
                        default=list(vqvae2.TEMPERATURES),
                        metavar="T", help="the priors' sampling temperatures: TOP BOTTOM, or "
                        "one for both; at 128 px a cooler top prior drew more varied, more real "
                        "slices (README, \"A cooler top prior\"); at 256 px T 1 scored better on "
                        "random-CNN distances and diversity in two runs, but in the second looked "
                        "worse to the eye (README, \"A second run at 256 px\")")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.minutes_given, args.minutes = hasattr(args, "minutes"), getattr(args, "minutes",
                                                                         MINUTES)
    if not all(0 <= rate < 1 for rate in args.prior_dropout):
        parser.error(f"--prior-dropout must be at least 0 and below 1, got {args.prior_dropout}")
    if args.style_bins < 0:
        parser.error(f"--style-bins must be 0 (none) or more, got {args.style_bins}")
    try:
        args.temperature = list(vqvae2.top_and_bottom(args.temperature))
    except ValueError as error:
        parser.error(str(error))
    if args.generate == 1 or args.generate < 0:
        parser.error("--generate must be 0 (none) or at least 2 (the metrics compare sets)")
    try:
        choose_folders(args)
    except ValueError as error:  # dataset.DataError too
        parser.error(str(error))
    return args


def choose_folders(args):
    """Fill --train-dir, --val-dir (and --test-dir, unless given) from --data's OASIS splits;
    a ValueError unless the slices were given one way."""
    if args.data and (args.train_dir or args.val_dir):
        raise ValueError("give --data ROOT or --train-dir and --val-dir, not both")
    if args.data:
        splits = dataset.oasis_split_dirs(args.data, need_test=False)
        args.train_dir, args.val_dir = str(splits["train"]), str(splits["validate"])
        args.test_dir = args.test_dir or (str(splits["test"]) if splits["test"] else "")
    elif not (args.train_dir and args.val_dir):
        raise ValueError("give the slices: --data ROOT (an OASIS keras_png_slices_data folder), "
                         "or --train-dir and --val-dir (folders of slices)")


def room_to_train(state, minutes):
    """Another epoch as long as the last fits under `minutes` (0: no limit), and epochs are
    left."""
    return state.get("epochs_done", 0) < EPOCHS and not train.time_is_up(minutes, state)


def reopen_if_given_time(state, state_path, minutes, dependents=()):
    """A finished stage with room under `minutes` for another epoch as long as its last (and
    epochs left) is marked unfinished, on disk at once, so that it trains on and a kill now
    resumes it. Refused if `dependents` (prior states) learned its codes: training the first
    stage on would outdate them, and lose the best.keras they learned from."""
    if not (state.get("finished") and room_to_train(state, minutes)):
        return
    used = state["elapsed_minutes"] + state["epoch_seconds"] / 60
    if dependents:
        sys.exit(f"error: --minutes gives the first stage in {state_path.parent} room to train "
                 f"on, but {', '.join(path.name for path in dependents)} learned its codes: "
                 f"pass a first limit of at most {int(10 * used) / 10:g}, use a new --out, or "
                 f"delete the *_prior_* files first.")
    print(f"{state_path.name}: {state['elapsed_minutes']:.1f} of {minutes:g} minutes used: "
          f"training on", flush=True)
    del state["finished"]
    write_json(state, state_path)


def fit_stage(out, prefix, build, make_data, minutes, describe, kind, tied_to=None,
              more_time=False, dependents=(), anneal=False):
    """Train one stage to its time limit, saving {prefix}last.keras, {prefix}best.keras (best
    validation SSIM for the autoencoder, bits per code for a prior) and {prefix}state.json each
    epoch (monitor.Checkpoints); a finished stage is only loaded, one cut short resumes (its
    log trimmed to the epochs saved). make_data(seed) -> (training, validation) batches,
    reshuffled per resumed part; with more_time (--minutes given), a finished one trains on if
    its limit allows (reopen_if_given_time); with anneal, the learning rate follows
    CosineOverTime. A prior is `tied_to` the first stage's
    best.keras: if that file changed, the run is refused. -> the stage's best model."""
    stop_if_signalled()  # one that came between two stages
    state_path = out / f"{prefix}state.json"
    state = read_json(state_path) if state_path.exists() else {}
    fingerprint = file_sha256(tied_to) if tied_to else None
    if state and state.get("vqvae_sha256") != fingerprint:
        sys.exit(f"error: {out / 'best.keras'} changed after {state_path} was trained on its "
                 f"codes: use a new --out, or delete the {prefix}* files to train it again.")
    if more_time:
        reopen_if_given_time(state, state_path, minutes, dependents)
    if not state.get("finished"):
        model = load_checkpoint(out / f"{prefix}last.keras", kind) if state else build()
        if tied_to:
            state["vqvae_sha256"] = fingerprint
        monitor, loss = (("val_ssim", "loss") if kind is TwoLevelVQVAE
                         else ("val_bits_per_code", "bits_per_code"))
        log = out / f"{prefix}training_log.csv"
        trim_log(log, state.get("epochs_done", 0))  # an epoch logged but never saved
        clock = WallClock(EPOCHS, minutes, state.get("elapsed_minutes", 0.0) * 60, describe,
                          name=prefix)
        schedule = [CosineOverTime(clock, LEARNING_RATE)] if anneal else []
        callbacks = [clock, *schedule,
                     keras.callbacks.CSVLogger(str(log), append="epochs_done" in state),
                     keras.callbacks.TerminateOnNaN(),
                     Checkpoints(out, state, prefix, monitor, kind is TwoLevelVQVAE, log=log),
                     StopOnSignal()]  # last: it may stop right after an epoch is saved
        if room_to_train(state, minutes):
            train.fit(model, *make_data(state.get("epochs_done", 0)), EPOCHS, state,
                      callbacks, loss, "learning rate")
        state["finished"] = True
        write_json(state, state_path)
    return load_checkpoint(out / f"{prefix}best.keras", kind)


EPOCHS = 1000  # each stage stops at its time limit
LEARNING_RATE = 1e-3  # Adam's, every stage
MINUTES = (40.0, 30.0, 20.0)  # the stages' limits: 90 minutes in all
STYLE_BINS = 4  # of each style measure: the top prior's STYLE_BINS^2 style classes
KEPT_FLAGS = ("image_size", "width", "res_blocks", "code_dim", "codebook_size", "top_prior",
              "bottom_prior", "prior_dropout", "schedule",
              "style_bins")  # a run's model and how it trains
BEFORE_FLAG = {"schedule": "constant", "style_bins": 0}  # what runs before a flag existed used


def check_same_model(args, out):
    """A run's KEPT_FLAGS are kept in args.json; a later run in the same --out must agree."""
    path, given = out / "args.json", {name: getattr(args, name) for name in KEPT_FLAGS}
    if not path.exists():
        write_json(given, path)
    saved = read_json(path)
    default = build_parser().get_default  # for a flag newer than the run
    kept = {name: saved.get(name, BEFORE_FLAG.get(name, default(name))) for name in KEPT_FLAGS}
    changed = [f"--{name.replace('_', '-')} {' '.join(map(str, np.ravel(kept[name])))}"
               for name in KEPT_FLAGS if kept[name] != given[name]]
    if changed:
        sys.exit(f"error: {out} holds a run with other settings ({path}): pass "
                 f"{', '.join(changed)}, or use a new --out.")


def code_datasets(codes, batch_size, seed):
    """{split: (code maps, condition maps or None)} -> (training batches, shuffled with
    `seed`, validation batches)."""
    def batches(split, shuffle):
        maps, condition = codes[split]
        data = tf.data.Dataset.from_tensor_slices(maps if condition is None
                                                  else (maps, condition))
        return (data.shuffle(len(maps), seed=seed) if shuffle else data).batch(batch_size)

    return batches("train", True).prefetch(tf.data.AUTOTUNE), batches("validate", False)


def build_prior(size, grid, codebook_size, dropout, condition=(0, 0)):
    """A fresh prior, conditioned on maps of condition = (grid, codebook size): the bottom
    prior on the top map's codes, a styled top prior on a 1x1 map of style classes."""
    width, layers_, kernel = size
    prior = PixelCNNPrior(grid_size=grid, codebook_size=codebook_size, width=width,
                          layers=layers_, kernel_size=kernel, dropout=dropout,
                          condition_grid=condition[0], condition_codebook=condition[1])
    prior.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
    return prior


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out)
    draw = ["--checkpoint", str(out), "--generate", str(args.generate), "--temperature",
            *map(str, args.temperature), "--seed", str(args.seed), "--batch-size",
            str(args.batch_size)]  # predict.py's arguments: it draws and measures samples
    with holding_run_lock(out):  # one run at a time in --out, until its samples are drawn
        with catching_stop_signals():  # Ctrl-C or SIGTERM: stop at the next batch
            try:
                train_stages(args, out)
            except dataset.DataError as error:
                sys.exit(f"error: {error}")
            except (Interrupted, KeyboardInterrupt) as stop:  # a signal, or a second at once
                sys.exit(stop_message(out, settle_after_stop(out, stop), argv,
                                      draw if args.generate else None))
        if args.generate:
            try:
                predict.main(draw)
            except KeyboardInterrupt:  # sampling is not a training stage: it just stops
                sys.exit(f"stopped while drawing the samples; every stage is saved in {out}. "
                         f"Draw them with:\n  {shlex.join(['python', 'predict.py', *draw])}")


def stop_message(out, signal_name, argv, draw):
    """What a run stopped by a signal has saved, and the command that goes on from there:
    `argv` again to resume training, or `draw` (predict.py's arguments, or None) once every
    stage is done."""
    stopped = f"stopped by {signal_name}"
    states = [out / f"{prefix}state.json" for prefix in ("", "top_prior_", "bottom_prior_")]
    if all(path.exists() and read_json(path).get("finished") for path in states):
        return f"{stopped}: every stage is trained and saved in {out}" + (
            f". Draw the samples with:\n  {shlex.join(['python', 'predict.py', *draw])}"
            if draw else ".")
    done = [f"{read_json(path).get('epochs_done', 0)} of the {name}" for path, name in zip(
        states, ("first stage", "top prior", "bottom prior")) if path.exists()]
    return (f"{stopped}: epochs saved in {out}: {', '.join(done) or 'none'}; the epoch in "
            f"progress (if any) was dropped. Resume with the same command:\n"
            f"  {shlex.join(['python', 'two_level.py', *argv])}")


def stop_if_signalled():
    """Stop at once if a stop signal came outside an epoch (encoding takes a minute)."""
    if stop_signal_received():
        raise Interrupted(stop_signal_received())


def train_stages(args, out):
    """The three stages, each trained, resumed or loaded as its state says."""
    remove_leftovers(out)  # what a killed run was writing
    check_same_model(args, out)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(train.choose_precision("auto"))
    paths = {split: dataset.list_images(folder) for split, folder in
             (("train", args.train_dir), ("validate", args.val_dir),
              ("test", args.test_dir or args.val_dir))}
    stop_if_signalled()  # checking every file can take a while
    if args.generate and len(paths["test"]) < 4:
        folder = args.test_dir or args.val_dir
        sys.exit(f"error: the metrics need at least 4 test slices, {folder} has "
                 f"{len(paths['test'])}: pass another --test-dir.")

    def images(seed):
        return (dataset.load_split(paths["train"], args.image_size, args.batch_size,
                                   shuffle=True, seed=args.seed + seed),
                dataset.load_split(paths["validate"], args.image_size, args.batch_size))

    def build_vqvae():
        variance = train.pixel_variance(paths["train"], args.train_dir, args)
        model = TwoLevelVQVAE(args.image_size, args.width, args.res_blocks, args.code_dim,
                              args.codebook_size, data_variance=variance, seed=args.seed)
        model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE))
        return model

    vqvae = fit_stage(out, "", build_vqvae, images, args.minutes[0],
                      lambda logs: f"val SSIM {logs['val_ssim']:.4f}", TwoLevelVQVAE,
                      more_time=args.minutes_given, anneal=args.schedule == "cosine",
                      dependents=sorted(out.glob("*_prior_state.json")))
    started = time.time()
    styles = {split: [] for split in ("train", "validate")}

    def noting_styles(split):  # each batch's brain_styles, as the batch goes by to be encoded
        for batch in dataset.load_split(paths[split], args.image_size, 64):
            styles[split].append(metrics.brain_styles(batch.numpy()))
            stop_if_signalled()
            yield batch

    codes = {split: vqvae.encode_all(noting_styles(split)) for split in styles}
    styles = {split: np.concatenate(rows) for split, rows in styles.items()}
    classes = StyleClasses(styles["train"], args.style_bins) if args.style_bins else None
    record_run(args, out, classes)
    K = vqvae.codebook_size
    print(f"encoded both splits in {time.time() - started:.0f} s; validation code usage: "
          + ", ".join(f"{level} {len(np.unique(maps)) / K:.0%}" for level, maps
                      in zip(("top", "bottom"), codes["validate"])), flush=True)
    bits = lambda logs: f"val bits/code {logs['val_bits_per_code']:.3f}"  # noqa: E731
    top_grid, bottom_grid = args.image_size // 8, args.image_size // 4
    top_codes = {split: (top, classes(styles[split])[:, None, None] if classes else None)
                 for split, (top, _) in codes.items()}
    both_codes = {split: (bottom, top) for split, (top, bottom) in codes.items()}
    tie = dict(kind=PixelCNNPrior, tied_to=out / "best.keras", more_time=args.minutes_given,
               anneal=args.schedule == "cosine")
    fit_stage(
        out, "top_prior_", lambda: build_prior(args.top_prior, top_grid, K, args.prior_dropout[0],
                                               (1, classes.count) if classes else (0, 0)),
        lambda seed: code_datasets(top_codes, args.prior_batch_size, args.seed + seed),
        args.minutes[1], bits, **tie)
    fit_stage(
        out, "bottom_prior_",
        lambda: build_prior(args.bottom_prior, bottom_grid, K, args.prior_dropout[1],
                            (top_grid, K)),
        lambda seed: code_datasets(both_codes, args.prior_batch_size, args.seed + seed),
        args.minutes[2], bits, **tie)
    stop_if_signalled()  # after the last epoch: say so rather than draw samples


def record_run(args, out, classes):
    """run.json: what predict.py needs to load this run (as train.py's config.json gives it):
    the splits, the precision it ran in (the first call's, kept: a later call on a machine
    without bfloat16 does not train a finished stage), and the style classes the top prior was
    trained on."""
    folder = lambda name: str(Path(name).resolve())  # noqa: E731
    path = out / "run.json"
    precision = ((read_json(path).get("precision") if path.exists() else None)
                 or keras.mixed_precision.global_policy().name)
    write_json({"model": "two_level",
                "train": {"image_size": args.image_size, "skip_bad_files": False},
                "splits": {"train": folder(args.train_dir), "validate": folder(args.val_dir),
                           "test": folder(args.test_dir or args.val_dir)},
                "precision": precision,
                "style_classes": classes.get_config() if classes else None}, path)


if __name__ == "__main__":
    main()
