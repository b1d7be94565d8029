"""Reconstruct a test split with a trained VQ-VAE: metrics, side-by-side comparisons, a grid.

    python predict.py                          # checkpoint and test split from out/config.json
    python predict.py --checkpoint out --test-dir ../shared/data/brain-slices/validate

Writes into --out (default: <checkpoint folder>/predict): report.json, comparison_NNN.png
(original | reconstruction | absolute difference) for --examples images, comparison_grid.png.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dataset  # noqa: E402
import modules  # noqa: E402

FOREGROUND = 0.02  # pixels brighter than this in the original count as brain, not background


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="out",
                        help="run folder of train.py (holds config.json and best.keras)")
    parser.add_argument("--weights", choices=["best", "last"], default="best",
                        help="best.keras (highest validation SSIM) or last.keras")
    parser.add_argument("--data", default="", help="OASIS root: its test split is used")
    parser.add_argument("--test-dir", default="", help="folder of test slices")
    parser.add_argument("--out", default="", help="output folder (default <checkpoint>/predict)")
    parser.add_argument("--examples", type=int, default=8, help="comparisons to save")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    for name in ("examples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_run(folder, weights):
    """(model, saved config dict) from a train.py output folder."""
    folder = Path(folder)
    config_path, model_path = folder / "config.json", folder / f"{weights}.keras"
    for path in (config_path, model_path):
        if not path.exists():
            hint = (" (no epoch has improved on the first yet?) Try --weights last."
                    if weights == "best" and (folder / "last.keras").exists() else "")
            sys.exit(f"error: {path} not found: --checkpoint must be the --out folder of a "
                     f"train.py run (default out/).{hint}")
    try:
        model = keras.models.load_model(model_path)
    except Exception as error:
        sys.exit(f"error: could not load {model_path} ({str(error).splitlines()[0]}). It may "
                 f"be damaged or written by an older version of modules.py: train again.")
    return model, json.loads(config_path.read_text())


def test_folder(args, config):
    if args.test_dir:
        return args.test_dir
    if args.data:
        return str(dataset.oasis_split_dirs(args.data)["test"])
    if config["splits"].get("test"):
        return config["splits"]["test"]
    sys.exit("error: the training run had no test split: pass --test-dir FOLDER or --data ROOT.")


def reconstruct_all(model, batches, image_size):
    """Run the model over every batch -> images, reconstructions, codes, per-image SSIM and
    PSNR, and images/s. The batches are decoded into memory first and the model traced once
    for any batch size, so images/s measures the model alone (encode, quantise, decode)."""
    batches = list(batches)
    spec = tf.TensorSpec((None, image_size, image_size, 1), tf.float32)
    forward = tf.function(lambda x: model.forward(x), input_signature=[spec])
    forward(batches[0])  # trace once
    started = time.perf_counter()
    outputs = [forward(batch) for batch in batches]
    reconstructions = [np.clip(raw.numpy(), 0.0, 1.0) for raw, _, _ in outputs]
    per_second = sum(map(len, reconstructions)) / (time.perf_counter() - started)
    quality = [modules.image_quality(batch, recon) for batch, recon in zip(batches, reconstructions)]
    ssim, psnr = (np.concatenate([q[i].numpy() for q in quality]) for i in (0, 1))
    codes = np.concatenate([batch_codes.numpy() for _, batch_codes, _ in outputs])
    images = np.concatenate([batch.numpy() for batch in batches])
    return images, np.concatenate(reconstructions), codes, ssim, psnr, per_second


def foreground_psnr(images, reconstructions):
    """PSNR over brain pixels only (original > FOREGROUND), per image: background is easy."""
    mask = images > FOREGROUND
    squared = ((images - reconstructions) ** 2 * mask).sum(axis=(1, 2, 3))
    mse = squared / np.maximum(mask.sum(axis=(1, 2, 3)), 1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def summarise(values):
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "p5": float(np.percentile(values, 5)), "min": float(np.min(values))}


def save_comparison(ax_row, original, reconstruction, ssim, psnr):
    difference = np.abs(original - reconstruction)
    panels = [(original, "original", "gray", 1.0),
              (reconstruction, f"reconstruction\nSSIM {ssim:.3f}, PSNR {psnr:.1f} dB", "gray", 1.0),
              (difference, f"|difference| (max {difference.max():.2f})", "magma", 0.25)]
    for ax, (image, title, cmap, vmax) in zip(ax_row, panels):
        ax.imshow(image[..., 0], cmap=cmap, vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.axis("off")


def save_figures(out, images, reconstructions, ssim, psnr, count):
    picks = np.linspace(0, len(images) - 1, num=min(count, len(images))).round().astype(int)
    for n, i in enumerate(picks):
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        save_comparison(axes, images[i], reconstructions[i], ssim[i], psnr[i])
        fig.tight_layout()
        fig.savefig(out / f"comparison_{n:03d}.png", dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.6 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        save_comparison(row, images[i], reconstructions[i], ssim[i], psnr[i])
    fig.tight_layout()
    fig.savefig(out / "comparison_grid.png", dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    model, config = load_run(args.checkpoint, args.weights)
    try:
        evaluate(args, model, config)
    except dataset.DataError as error:
        sys.exit(f"error: {error}")


def evaluate(args, model, config):
    """Reconstruct the test split; print and save the report and the figures."""
    folder = test_folder(args, config)
    paths = dataset.list_images(folder)
    image_size = config["train"]["image_size"]
    batches = dataset.load_split(paths, image_size, args.batch_size)
    with dataset.naming_bad_files(paths):
        images, reconstructions, codes, ssim, psnr, per_second = reconstruct_all(
            model, batches, image_size)
    perplexity, usage = modules.code_statistics(codes, model.codebook_size)
    report = {
        "checkpoint": str(Path(args.checkpoint) / f"{args.weights}.keras"),
        "test_dir": folder, "images": len(images), "image_size": image_size,
        "ssim": summarise(ssim), "psnr_db": summarise(psnr),
        "foreground_psnr_db": summarise(foreground_psnr(images, reconstructions)),
        "codebook_usage": float(usage), "perplexity": float(perplexity),
        "codebook_size": model.codebook_size, "images_per_second": per_second,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)",
    }
    out = Path(args.out or Path(args.checkpoint) / "predict")
    out.mkdir(parents=True, exist_ok=True)
    save_figures(out, images, reconstructions, ssim, psnr, args.examples)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(images)} test images from {folder}")
    for key in ("ssim", "psnr_db", "foreground_psnr_db"):
        stats = report[key]
        print(f"  {key:<19} mean {stats['mean']:.4f}  median {stats['median']:.4f}  "
              f"p5 {stats['p5']:.4f}  min {stats['min']:.4f}")
    print(f"  codebook usage {usage:.1%} of {model.codebook_size} codes, perplexity "
          f"{perplexity:.1f}, {per_second:.1f} images/s on {report['device']}")
    print(f"wrote {out / 'report.json'}, {min(args.examples, len(images))} comparisons and "
          f"comparison_grid.png")


if __name__ == "__main__":
    main()
