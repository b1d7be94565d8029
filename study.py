"""Quality per FLOP: which VQ-VAE gets furthest for the compute it spends.

Each variant of the 64x64-grid model (`train.py --purpose reconstruct`, "default" below), the
32x32-grid models (`--purpose generate`, and the narrower one the demo uses) and the keras.io
reference trains from scratch on the same slices in the same order for the same number of
images, in the precision `--precision auto` picks. On the way it is scored on the whole
validation split (mean SSIM and PSNR of the clipped reconstructions, as time_to_quality below
scores them for bench.py --budgets), and its training FLOPs per image are counted by
TensorFlow's profiler (bench.count_flops). A variant is on the Pareto front when no
other variant reaches at least its final SSIM with at most its FLOPs per image.

    python study.py --train-dir ../shared/data/brain-slices/train \\
                    --val-dir ../shared/data/brain-slices/validate     # out/study.json

Counting images seen, not minutes, keeps a slow spell of a shared machine out of the verdict;
the seconds each run trained are recorded beside it. Every variant starts from seed 0; the
default is trained again from seed 1, so the table shows how big a difference noise makes.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import bench
import dataset
import modules
import train
from settings import purpose_config

# name -> Config fields changed from the 64x64-grid model ("default"); None is the keras.io
# reference model. With --tiny, the tiny sizes apply where a variant does not set its own.
VARIANTS = {
    "default": {},
    "default seed 1": {"seed": 1},
    "width 32": {"width": 32},
    "width 48": {"width": 48},
    "no residual block": {"res_blocks": 0},
    "2 residual blocks": {"res_blocks": 2},
    "code dim 16": {"code_dim": 16},
    "K 256": {"codebook_size": 256},
    "transposed output": {"decoder_output": "transposed"},  # the decoder before sub-pixel
    "demo first stage": {"downsample": 8},  # 32x32 codes from the width-64 model
    "purpose generate": {"downsample": 8, "width": 128, "res_blocks": 2},
    "reference": None,
}
REPEATS = {"default seed 1"}  # noise estimates: never on the front


def run_variant(config, overrides, slices, steps, precision):
    """Train one variant for `steps` steps -> its FLOPs, size, time and scores at 1/4, 1/2
    and all of the steps."""
    config = dataclasses.replace(config, **(overrides or {}))
    keras.utils.set_random_seed(config.seed)
    kind = "reference" if overrides is None else "ours"
    model = bench.build(kind, config, precision, slices["variance"])
    model.optimizer.build(model.trainable_variables)
    spec = tf.TensorSpec((config.batch_size, config.image_size, config.image_size, 1))
    flops = bench.count_flops(model.train_step, spec) / config.batch_size
    step, batches = bench.fit_step(model), iter(slices["train"])
    run = {"model": model, "seconds": 0.0, "seen": 0}
    checkpoints, scores = {max(1, steps // 4), max(1, steps // 2), steps}, []
    for i in range(1, steps + 1):
        batch = next(batches)
        started = time.perf_counter()
        step(batch)
        run["seconds"] += time.perf_counter() - started
        run["seen"] += len(batch)
        if i in checkpoints:
            scores.append(score(run, slices["validate"]))
    return {"overrides": overrides, "gflop_per_image": flops / 1e9,
            "parameters": model.count_params(), "scores": scores}


def time_to_quality(config, budgets, train_dir, val_dir, steps_per_turn=20):
    """Train ours and the reference from scratch, taking turns of `steps_per_turn` steps so
    that drift hits both alike, each on its own clock (training steps only). When a model's
    clock passes a budget it is scored on the whole validation split: mean SSIM and PSNR of
    clip(model(x)) by modules.image_quality (as VQVAE's validation), with images seen so far.
    One run per model serves every budget: the learning rate is constant, so a run stopped at
    5 minutes is the first 5 minutes of the 30-minute run."""
    slices = load_slices(config, train_dir, val_dir)
    precision = train.choose_precision(config.precision)
    runs = {}
    for kind in ("ours", "reference"):
        model = bench.build(kind, config, precision, slices["variance"])
        runs[kind] = {"model": model, "step": bench.fit_step(model),
                      "batches": iter(slices["train"]), "seconds": 0.0, "seen": 0, "scores": []}
    limits = sorted(60 * b for b in budgets)
    while any(len(run["scores"]) < len(limits) for run in runs.values()):
        for kind, run in runs.items():
            if len(run["scores"]) == len(limits):
                continue
            for _ in range(steps_per_turn):
                batch = next(run["batches"])
                started = time.perf_counter()
                run["step"](batch)
                run["seconds"] += time.perf_counter() - started
                run["seen"] += len(batch)
                if run["seconds"] >= limits[len(run["scores"])]:
                    run["scores"].append(score(run, slices["validate"]))
                    break
    return {"precision": precision, **{kind: run["scores"] for kind, run in runs.items()}}


def load_slices(config, train_dir, val_dir):
    """{'train': endless shuffled batches (whole batches only), 'validate': a list of batches,
    'variance': training pixel variance}, every slice decoded before any clock starts."""
    paths = {name: dataset.list_images(folder) for name, folder in (("train", train_dir),
                                                                    ("validate", val_dir))}
    train_ds = dataset.load_split(paths["train"], config.image_size, config.batch_size,
                                  shuffle=True, seed=0, drop_remainder=True)
    for _ in train_ds:  # fill the cache
        pass
    return {"train": train_ds.repeat(), "variance": train.pixel_variance(
                paths["train"], train_dir, config),
            "validate": list(dataset.load_split(paths["validate"], config.image_size, 64))}


def score(run, val_batches):
    quality = [modules.image_quality(x, run["model"](x)) for x in val_batches]
    ssim, psnr = (np.concatenate([q[i].numpy() for q in quality]) for i in (0, 1))
    return {"minutes": run["seconds"] / 60, "images_seen": run["seen"],
            "ssim": float(ssim.mean()), "psnr_db": float(psnr.mean())}


def pareto_front(results):
    """Names of the variants (repeats left out) that no other beats on both axes: at most
    the FLOPs per image and at least the final SSIM, better on one."""
    points = {name: (r["gflop_per_image"], r["scores"][-1]["ssim"])
              for name, r in results.items() if name not in REPEATS}
    dominated = lambda a, b: b[0] <= a[0] and b[1] >= a[1] and b != a
    return [name for name, point in points.items()
            if not any(dominated(point, other) for other in points.values())]


def table(results, front):
    w = max(map(len, ["variant", *results]))
    lines = [f"{'variant':{w}s} {'GFLOP/img':>9s} {'params':>8s} {'images':>7s} {'SSIM':>7s} "
             f"{'PSNR dB':>7s} {'train s':>7s}  front"]
    for name, r in results.items():
        for s in r["scores"]:
            mark = "yes" if name in front and s is r["scores"][-1] else ""
            lines.append(f"{name:{w}s} {r['gflop_per_image']:9.3f} {r['parameters']:8d} "
                         f"{s['images_seen']:7d} {s['ssim']:7.4f} {s['psnr_db']:7.2f} "
                         f"{60 * s['minutes']:7.0f}  {mark}")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-dir", required=True, help="training slices")
    parser.add_argument("--val-dir", required=True, help="validation slices (all scored)")
    parser.add_argument("--steps", type=int, default=300,
                        help="training steps of --batch-size images per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated names from: " + ", ".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true",
                        help="32x32 images and a tiny base model: seconds (for the tests)")
    parser.add_argument("--out", default="out/study.json", help="the JSON file written")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    config = purpose_config("reconstruct", **(bench.TINY if args.tiny else {}))
    precision = train.choose_precision(config.precision)
    slices = load_slices(config, args.train_dir, args.val_dir)
    results = {}
    for name in args.variants:
        results[name] = run_variant(config, VARIANTS[name], slices, args.steps, precision)
        print(f"done: {name}", flush=True)
    front = pareto_front(results)
    print("\n".join(table(results, front)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "environment": bench.environment(config, precision, args.tiny), "steps": args.steps,
        "variants": results, "pareto_front": front}, indent=1))
    print(f"wrote {args.out}")
    return results, front


if __name__ == "__main__":
    main()
