"""train.py's settings: the one Config of a run, its command line, and the checks that refuse
impossible settings, contradicting flags and unusable saved runs before any work is done.

A run saves its Config in config.json; `--resume` and `--prior-only` read it back
(`saved_settings`), and predict.py reads the folders and sizes it needs from it
(`read_run_config`).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from monitor import finish_saves, read_json


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
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16
    jit_compile: str = "auto"  # auto | on | off: XLA for the training steps
    strategy: str = "auto"  # auto | default | mirrored | multiworker (distribute.py)
    seed: int = 0
    # model: --purpose sets the first stage's size (PURPOSES) where no flag gives it
    purpose: str = "generate"  # generate | reconstruct
    downsample: int = 8
    width: int = 128
    res_blocks: int = 2
    decoder_output: str = "subpixel"  # subpixel | transposed: the decoder's last doubling
    code_dim: int = 32
    codebook_size: int = 512
    beta: float = 0.25
    codebook: str = "ema"  # ema | loss (the original codebook loss)
    ema_decay: float = 0.99
    dead_code_steps: int = 100
    progress_images: int = 6
    skip_bad_files: bool = False  # leave unreadable images out (listed) instead of stopping
    # stage two: the PixelCNN prior over code maps, trained after the VQ-VAE (0 epochs: none)
    prior_epochs: int = 20
    prior_batch_size: int = 8  # 4x the steps of 32: twice the learning per minute (2-core CPU)
    prior_learning_rate: float = 1e-3
    prior_time_limit: float | None = None  # minutes; 0 = no limit; None = unset
    prior_width: int = 64
    prior_layers: int = 8  # as deep as 12 per minute and likelier samples (README)
    prior_kernel: int = 5
    prior_dropout: float = 0.0


HELP = {
    "data": "OASIS root holding keras_png_slices_{train,validate,test}",
    "train_dir": "folder of training slices (PNG/JPEG); needs --val-dir",
    "val_dir": "folder of validation slices",
    "test_dir": "folder of test slices (optional; saved for predict.py)",
    "out": "output folder", "image_size": "images are fitted into this square (pixels; the "
                                             "demo set in float32 uses 128 with --purpose "
                                             "generate unless this or --downsample is given)",
    "epochs": "epochs in all (a resumed run counts the epochs already done; the demo set "
              "in float32 uses 12 where it sets --image-size 128)",
    "batch_size": "images per training step: the global batch, split evenly across the "
                  "replicas of a --strategy", "learning_rate": "Adam learning rate",
    "time_limit": "stop when another epoch would pass this many minutes of training, resumed "
                  "parts included (0: no limit; unset: none, or 5 on the demo set where it "
                  "does not count epochs instead)",
    "precision": "auto: mixed_bfloat16 on a CPU with bfloat16 instructions and on GPUs of "
                 "compute capability 8 (Ampere) or newer, mixed_float16 (with loss scaling) on "
                 "GPUs of capability 7, else float32",
    "jit_compile": "compile the training steps with XLA; auto: off, the faster on the "
                   "machines measured (XLA was ~3x slower on a 2-core CPU; not measured on "
                   "GPU yet: python bench.py measures both)",
    "strategy": "tf.distribute strategy of both stages: mirrored (every GPU of this machine), "
                "multiworker (the machines in TF_CONFIG), default (one device); auto: "
                "multiworker if TF_CONFIG names several workers, else mirrored if there are "
                "several GPUs, else default. --batch-size and --prior-batch-size stay the "
                "global batch, split across the replicas; learning rates are not rescaled",
    "seed": "seed for weights, shuffling and the demo set",
    "purpose": "what the model is for, which sets the three flags below unless given: "
               "generate: a 32x32 code grid that the prior can learn on a CPU, from a wider "
               "first stage (--downsample 8 --width 128 --res-blocks 2); "
               "reconstruct: the sharpest reconstructions, from a 64x64 grid whose prior needs "
               "hours (--downsample 4 --width 64 --res-blocks 1). README: which to choose",
    "downsample": "image-to-latent-grid factor (4: 64x64 codes at 256 px, 8: 32x32; the "
                  "float32 demo: 8 at 128 px, 16x16 codes)",
    "width": "channels at the latent resolution (at least 8; the demo set uses 64 unless "
             "given, with --purpose generate)",
    "res_blocks": "residual blocks at the latent resolution, in encoder and decoder (the demo "
                  "set uses 1 unless given, with --purpose generate)",
    "decoder_output": "the decoder's last doubling: subpixel (a 3x3 convolution to 2x2 pixel "
                      "blocks; 1.3x faster steps on CPU, no checkerboard) or transposed (a "
                      "transposed convolution to full size and a 1-channel 3x3 convolution, the "
                      "design before the sub-pixel stage; study.py compares them)",
    "code_dim": "code vector dimension D", "codebook_size": "number of codes K",
    "beta": "commitment cost",
    "codebook": "ema: exponential moving averages; loss: learned by the codebook loss",
    "ema_decay": "decay of the codebook moving averages",
    "dead_code_steps": "re-seed a code after this many training steps unused",
    "progress_images": "validation images shown in the progress GIF",
    "skip_bad_files": "leave out unreadable or undecodable images, listing them in the log and "
                      "config.json, instead of stopping with an error",
    "prior_epochs": "epochs of the PixelCNN prior after the VQ-VAE (0: no prior; the demo "
                    "set in float32 uses 12 where it sets --image-size 128)",
    "prior_batch_size": "code maps per prior training step (global, like --batch-size; on "
                        "GPUs, larger batches use the device better)",
    "prior_learning_rate": "Adam learning rate of the prior",
    "prior_time_limit": "like --time-limit, for the prior (unset: none, or 4 on the demo set "
                        "where it does not count epochs instead)",
    "prior_width": "channels of each prior stack (the demo set uses 32 unless given, with "
                   "--purpose generate)",
    "prior_layers": "gated layers of the prior (the demo set uses 12 unless given, with "
                    "--purpose generate)",
    "prior_kernel": "prior kernel size k (odd): each layer reaches k//2 rows further up",
    "prior_dropout": "dropout rate in the prior's gated layers while it trains (0: none)",
}
CHOICES = {"purpose": ["generate", "reconstruct"],
           "precision": ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
           "codebook": ["ema", "loss"], "decoder_output": ["subpixel", "transposed"],
           "jit_compile": ["auto", "on", "off"],
           "strategy": ["auto", "default", "mirrored", "multiworker"]}
# settings that runs saved before they existed lack; such a run reads them at these values
# (purpose is only a label there: a saved run keeps the sizes it was built with)
ADDED_LATER = {"purpose": "reconstruct", "decoder_output": "subpixel", "skip_bad_files": False,
               "jit_compile": "auto", "strategy": "auto", "prior_dropout": 0.0}
# jit_compile and strategy change how the steps run, not the model: a resumed run may switch
RESUMABLE = ("epochs", "time_limit", "out", "prior_epochs", "prior_time_limit",
             "skip_bad_files", "jit_compile", "strategy")
# the first stage each --purpose trains (README: generation, the model for the purpose)
PURPOSES = {"generate": {"downsample": 8, "width": 128, "res_blocks": 2},
            "reconstruct": {"downsample": 4, "width": 64, "res_blocks": 1}}
GRID_HINT = {"generate": "; --purpose generate uses --downsample 8 unless given: give "
                         "--downsample 4, --purpose reconstruct, or an --image-size that 8 "
                         "divides", "reconstruct": ""}
PRIOR_SETTINGS = tuple(name for name in HELP if name.startswith("prior_")) + (
    "out", "skip_bad_files", "jit_compile", "strategy")


def parse_args(argv=None, chief=True):
    """(Config, mode) from the command line; mode says resume, prior_only and which flags
    were given. Only the chief worker (see distribute.py) finishes a killed run's saves.
    Flags default to None here so that the ones actually given can be told apart (a resumed
    or --prior-only run takes the rest from its config.json)."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train the VQ-VAE on OASIS brain slices (or the built-in "
        "demo set), then the PixelCNN prior over its codes.")
    for field in dataclasses.fields(Config):
        flag, help_ = "--" + field.name.replace("_", "-"), HELP[field.name]
        if field.type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_)
            continue
        choices = CHOICES.get(field.name)
        kind = float if field.name.endswith("time_limit") else type(field.default)
        default = (" or ".join(f"{preset[field.name]} ({purpose})" for purpose, preset
                               in PURPOSES.items()) if field.name in PURPOSES["generate"]
                   else repr(field.default))
        parser.add_argument(flag, type=kind, choices=choices, help=f"{help_} (default: {default})")
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
        flag = "--resume" if args.resume else "--prior-only"
        saved = saved_settings(given.get("out", Config.out), flag, chief)
        conflicts = [f"--{name.replace('_', '-')} {given[name]!r} (the run has "
                     f"{saved[name]!r})" for name in sorted(set(given) - set(allowed))
                     if given[name] != saved[name]]
        if conflicts:
            flags = ", ".join("--" + name.replace("_", "-") for name in allowed)
            parser.error(f"{flag} keeps the saved settings, and these contradict them: "
                         f"{'; '.join(conflicts)}. Only {flags} may change; for other "
                         f"settings start a new run in another --out.")
        config = Config(**{**saved, **given})
    else:
        config = purpose_config(**{"purpose": Config.purpose, **given})
    check(config, parser)
    if args.prior_only and (Path(config.out) / "prior_state.json").exists():
        parser.error(f"{config.out} holds a prior already: continue it with --resume, or delete "
                     f"its prior_* files to train a new one")
    if args.prior_only and config.prior_epochs == 0:
        if "prior_epochs" in given:
            parser.error("--prior-only needs --prior-epochs of at least 1")
        config.prior_epochs = Config.prior_epochs  # the run was saved with its prior off
    mode = argparse.Namespace(resume=args.resume, prior_only=args.prior_only,
                              given=frozenset(given))
    return config, mode


def purpose_config(purpose, **settings):
    """The Config of a --purpose (its first-stage sizes, PURPOSES) with `settings` on top: a
    new run's settings are its given flags over the sizes of its --purpose."""
    return Config(**{"purpose": purpose, **PURPOSES[purpose], **settings})


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
                "--prior-dropout must be at least 0 and below 1":
                not 0 <= config.prior_dropout < 1,
                f"--out {config.out} is, or is inside, a file, not a folder": any(
                    p.is_file() for p in (Path(config.out), *Path(config.out).parents)),
                "--image-size must be at least 16 (SSIM's 11-pixel window must fit)":
                config.image_size < 16,
                f"--downsample must be 2, 4, 8 or 16 and divide --image-size "
                f"({config.image_size}){GRID_HINT[config.purpose]}": config.downsample not in
                (2, 4, 8, 16) or config.image_size % config.downsample != 0}
    for message, failed in problems.items():
        if failed:
            parser.error(message)


def saved_settings(out, flag, chief=True):
    """The settings saved by the run in `out` (for --resume and --prior-only). A run killed
    before its first epoch was saved has only config.json: --resume starts it afresh."""
    path = Path(out) / "config.json"
    if chief:  # the other workers of a cluster only read `out`
        finish_saves(out)  # complete (or discard) what a killed run was saving
    needed = [path] + ([] if flag == "--resume" else [path.with_name("best.keras"),
                                                      path.with_name("state.json")])
    if flag == "--resume" and path.with_name("state.json").exists():
        needed.append(path.with_name("last.keras"))
    for file in needed:
        if not file.exists():
            sys.exit(f"error: {flag} needs {file}, which does not exist: start a run with "
                     f"this --out first (or check --out).")
    return read_run_config(path)["train"]


def read_run_config(path):
    """config.json of a run, checked against this version's settings; a clear exit if it was
    written by another version or edited into something this one cannot use."""
    saved = read_json(path)
    settings = saved.get("train") if isinstance(saved, dict) else None
    splits = saved.get("splits") if isinstance(saved, dict) else None
    fields = {field.name: field.default for field in dataclasses.fields(Config)}
    problems = ([] if isinstance(splits, dict) and isinstance(splits.get("train"), str)
                and isinstance(splits.get("validate"), str) else ["its splits are missing"])
    if not isinstance(settings, dict):
        problems.append("its training settings are missing")
        settings = {}
    settings.update({name: value for name, value in ADDED_LATER.items() if name not in settings})
    problems += [f"unknown setting {name!r}" for name in settings if name not in fields]
    problems += [f"missing setting {name!r}" for name in fields if name not in settings]
    for name, value in settings.items():
        default = fields.get(name, value)
        numeric = isinstance(default, float) or default is None
        kinds = (int, float, type(None)) if numeric else (type(default),)
        if not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool):
            problems.append(f"{name} = {value!r} is not of the saved kind "
                            f"({type(default).__name__})")
        elif name in CHOICES and value not in CHOICES[name]:
            problems.append(f"{name} = {value!r} is not one of {', '.join(CHOICES[name])}")
    if problems:
        sys.exit(f"error: {path} was written by another version of train.py or edited by hand "
                 f"({'; '.join(problems)}). Restore it, or start a new run in another --out.")
    return saved
