"""Reconstruct a test split with a trained VQ-VAE, or generate new slices with its prior.

    python predict.py                          # checkpoint and test split from out/config.json
    python predict.py --checkpoint out --test-dir ../shared/data/brain-slices/validate
    python predict.py --generate 16            # 16 new slices from the prior, and their metrics
    python predict.py --checkpoint out/two_level --generate 16   # from a two_level.py run

Reconstruction writes into --out (default: <checkpoint folder>/predict): report.json,
comparison_NNN.png (original | reconstruction | absolute difference), comparison_grid.png.
Generation writes into --out (default: <checkpoint folder>/generate): sample_NNN.png,
samples_grid.png and generation_report.json (speed, and unless --no-metrics: likelihood,
diversity, memorisation and realism, each next to its baselines, see metrics.py; and
samples_and_real.png, samples above real test slices at the same size).

--checkpoint is the --out of a train.py run (config.json) or of a two_level.py run (run.json,
args.json): the same reports for the two-level code, its samples drawn by both priors.
"""

import argparse
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
from PIL import Image  # noqa: E402

import dataset  # noqa: E402
import metrics  # noqa: E402
import modules  # noqa: E402
import vqvae2  # noqa: E402
from prior import PixelCNNPrior  # noqa: E402
from monitor import file_sha256, load_checkpoint, read_json, write_json  # noqa: E402
from settings import read_run_config  # noqa: E402

FOREGROUND = 0.02  # pixels brighter than this in the original count as brain, not background


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="out",
                        help="run folder of train.py (holds config.json and best.keras) or "
                             "of two_level.py (run.json)")
    parser.add_argument("--weights", choices=["best", "last"], default="best",
                        help="best.keras (highest validation SSIM) or last.keras; --generate "
                             "always uses best.keras, the one its prior learned from")
    parser.add_argument("--data", default="", help="OASIS root: its test split is used")
    parser.add_argument("--test-dir", default="", help="folder of test slices")
    parser.add_argument("--out", default="", help="output folder (default <checkpoint>/predict)")
    parser.add_argument("--examples", type=int, default=8, help="comparisons to save")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="sample N new slices from the prior instead of reconstructing")
    parser.add_argument("--temperature", type=float, nargs="+", metavar="T",
                        default=argparse.SUPPRESS,  # its default depends on the run's kind
                        help="sampling temperature: below 1 favours the likeliest codes at "
                             "each position (for the demo prior 0.8 drew some empty slices: "
                             "README); default 1, and for a two_level.py run TOP BOTTOM (or one "
                             f"for both), default {' '.join(map(str, vqvae2.TEMPERATURES))}")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="with --generate: sample each code from only its K likeliest codes "
                             "(and any tied with the K-th; 0: from all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="leave out unreadable images (listed) instead of stopping; "
                             "on by default for a run trained with --skip-bad-files")
    parser.add_argument("--no-metrics", action="store_true",
                        help="with --generate: only sample, skip the metrics")
    args = parser.parse_args(argv)
    for name in ("examples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.generate < 0:
        parser.error("--generate must be a number of slices (at least 1)")
    if args.generate == 1 and not args.no_metrics:
        parser.error("--generate needs at least 2 slices for its metrics (or add --no-metrics)")
    args.temperature = getattr(args, "temperature", None)
    if args.temperature:
        try:
            vqvae2.top_and_bottom(args.temperature)
        except ValueError as error:
            parser.error(f"{error} (two, TOP BOTTOM, for a two_level.py run only)")
    if args.top_k < 0:
        parser.error("--top-k must be 0 (sample from all codes) or a number of codes")
    return args


def load_run(folder, weights):
    """(model, saved config dict) from a train.py output folder, or from a two_level.py one
    (two_level_config)."""
    folder = Path(folder)
    two_level = is_two_level(folder)
    config_path = folder / ("run.json" if two_level else "config.json")
    model_path = folder / f"{weights}.keras"
    if two_level and not config_path.exists():
        sys.exit(f"error: {config_path} not found: this two_level.py run was made before "
                 f"predict.py read two-level runs, or its first stage has not finished. Run its "
                 f"two_level.py command again with --out {folder} (and --generate 0 to draw "
                 f"nothing): it writes run.json once the first stage is done.")
    for path in (config_path, model_path):
        if not path.exists():
            hint = (" (no epoch has improved on the first yet?) Try --weights last."
                    if weights == "best" and (folder / "last.keras").exists() else "")
            sys.exit(f"error: {path} not found: --checkpoint must be the --out folder of a "
                     f"train.py run (default out/) or of a two_level.py run.{hint}")
    config = two_level_config(config_path) if two_level else read_run_config(config_path)
    # run the model in the precision it was trained in: layers rebuilt on loading take the
    # global policy, and float32 layers would pick slightly different codes than training did
    keras.mixed_precision.set_global_policy(config.get("precision", "float32"))
    kind = vqvae2.TwoLevelVQVAE if two_level else modules.VQVAE
    return load_checkpoint(model_path, kind), config


def is_two_level(folder):
    """A two_level.py run: its args.json (the model's flags) or a top prior's state, and no
    train.py config.json."""
    return (not (folder / "config.json").exists()
            and any((folder / name).exists() for name in ("args.json", "top_prior_state.json")))


def two_level_config(path):
    """run.json of a two_level.py run (two_level.record_run): config.json's keys that predict
    reads, and the style classes; a clear exit if it is not one."""
    saved = read_json(path)
    shape = {"model": str, "train": dict, "splits": dict, "precision": str}
    if not (isinstance(saved, dict) and saved.get("model") == "two_level"
            and all(isinstance(saved.get(key), kind) for key, kind in shape.items())
            and "style_classes" in saved
            and {"image_size", "skip_bad_files"} <= set(saved["train"])
            and all(isinstance(saved["splits"].get(split), str) for split in ("train", "test"))):
        sys.exit(f"error: {path} is not the run.json of a two_level.py run (edited by hand?): "
                 f"run its two_level.py command again with --out {path.parent} to rewrite it.")
    return saved


def load_generator(folder):
    """(prior, VQ-VAE, saved config): prior_best.keras and the best.keras it was trained on;
    for a two_level.py run, its TwoLevelGenerator as both."""
    folder = Path(folder)
    if is_two_level(folder):
        return load_two_level_generator(folder)
    vqvae, config = load_run(folder, "best")
    prior = tied_prior(folder, "prior_", f"this run has no prior. `python train.py` trains one "
                       f"after the VQ-VAE; `python train.py --prior-only --out {folder}` adds "
                       f"one to a finished run.", f"python train.py --resume --out {folder} "
                       f"trains a new prior for it.")
    return prior, vqvae, config


def load_two_level_generator(folder):
    """(generator, generator, config): a two_level.py run's best.keras and each prior's best
    checkpoint, both checked to have learned that best.keras's codes."""
    vqvae, config = load_run(folder, "best")
    command = f"its two_level.py command with --out {folder}"
    priors = [tied_prior(folder, prefix, f"this two_level.py run has not trained its priors "
                         f"yet: {command} trains them (it resumes a run cut short).",
                         f"delete its *_prior_* files (both priors learned the old codes) and "
                         f"run {command} again to train new ones.")
              for prefix in ("top_prior_", "bottom_prior_")]
    styles = config["style_classes"]
    try:
        generator = vqvae2.TwoLevelGenerator(
            vqvae, *priors, vqvae2.StyleClasses.from_config(styles) if styles else None)
    except ValueError as error:  # run.json's style classes and the top prior disagree
        sys.exit(f"error: {folder / 'run.json'} does not fit {folder / 'top_prior_best.keras'} "
                 f"({error}): run {command} again to rewrite it.")
    return generator, generator, config


def tied_prior(folder, prefix, missing, changed):
    """{prefix}best.keras of a run, checked to have learned the codes of the run's best.keras
    (the fingerprint in {prefix}state.json); a clear exit saying `missing` or `changed`."""
    path, state_path = folder / f"{prefix}best.keras", folder / f"{prefix}state.json"
    if not path.exists() or not state_path.exists():
        sys.exit(f"error: {path} not found: {missing}")
    if read_json(state_path).get("vqvae_sha256") != file_sha256(folder / "best.keras"):
        sys.exit(f"error: {folder / 'best.keras'} changed after {path.name} was trained on its "
                 f"codes: {changed}")
    return load_checkpoint(path, PixelCNNPrior)


def test_folder(args, config):
    if args.test_dir:
        return args.test_dir
    if args.data:
        return str(dataset.oasis_split_dirs(args.data)["test"])
    if config["splits"].get("test"):
        return config["splits"]["test"]
    sys.exit("error: the training run had no test split: pass --test-dir FOLDER or --data ROOT.")


def skip_bad(args, config):
    """Leave bad files out with --skip-bad-files, or when the run was trained with it."""
    return args.skip_bad_files or config["train"]["skip_bad_files"]


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
    return np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-30)), modules.PSNR_CAP_DB)


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


def device():
    return "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)"


def save_samples(out, samples):
    """sample_NNN.png for each slice, and samples_grid.png with up to 64 of them."""
    for n, image in enumerate(samples):
        pixels = (image[..., 0] * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(out / f"sample_{n:03d}.png")
    save_grid(out / "samples_grid.png", samples[:64])


def save_grid(path, images, columns=8, caption=None):
    """Images in rows of `columns`, on black, at 1.6 inches each; the caption goes on top."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.3 * bool(
        caption)), squeeze=False, facecolor="black")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    if caption:
        fig.suptitle(caption, color="white")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.generate:
            generate(args, *load_generator(args.checkpoint))
        else:
            evaluate(args, *load_run(args.checkpoint, args.weights))
    except dataset.DataError as error:
        sys.exit(f"error: {error}")


def evaluate(args, model, config):
    """Reconstruct the test split; print and save the report and the figures."""
    folder = test_folder(args, config)
    paths = dataset.list_images_skipping(folder, skip_bad(args, config))
    image_size = config["train"]["image_size"]
    batches = dataset.load_split(paths, image_size, args.batch_size)
    with dataset.naming_bad_files(paths):
        images, reconstructions, codes, ssim, psnr, per_second = reconstruct_all(
            model, batches, image_size)
    perplexity, usage = modules.code_statistics(codes, model.codebook_size)
    report = {
        "checkpoint": str(Path(args.checkpoint) / f"{args.weights}.keras"),
        "test_dir": folder, "images": len(images), "image_size": image_size,
        "ssim": metrics.summarise(ssim), "psnr_db": metrics.summarise(psnr),
        "foreground_psnr_db": metrics.summarise(foreground_psnr(images, reconstructions)),
        "codebook_usage": float(usage), "perplexity": float(perplexity),
        "codes": "bottom level" if isinstance(model, vqvae2.TwoLevelVQVAE) else "the one level",
        "codebook_size": model.codebook_size, "images_per_second": per_second,
        "device": device(),
    }
    out = Path(args.out or Path(args.checkpoint) / "predict")
    out.mkdir(parents=True, exist_ok=True)
    save_figures(out, images, reconstructions, ssim, psnr, args.examples)
    write_json(report, out / "report.json")
    print(f"{len(images)} test images from {folder}")
    for key in ("ssim", "psnr_db", "foreground_psnr_db"):
        stats = report[key]
        print(f"  {key:<19} mean {stats['mean']:.4f}  median {stats['median']:.4f}  "
              f"p5 {stats['p5']:.4f}  min {stats['min']:.4f}")
    print(f"  codebook usage ({report['codes']}) {usage:.1%} of {model.codebook_size} codes, "
          f"perplexity {perplexity:.1f}, {per_second:.1f} images/s on {report['device']}")
    print(f"wrote {out / 'report.json'}, {min(args.examples, len(images))} comparisons and "
          f"comparison_grid.png")


def generate(args, prior, vqvae, config):
    """Sample --generate code maps, decode them, save them; then measure them (metrics.py)."""
    if args.top_k > prior.codebook_size:
        sys.exit(f"error: --top-k {args.top_k} is more than the {prior.codebook_size} codes "
                 f"of this run's codebook: use at most {prior.codebook_size}, or 0 for all.")
    two_level = isinstance(prior, vqvae2.TwoLevelGenerator)
    top_temperature, temperature = sampling_temperatures(args, two_level)
    out = Path(args.out or Path(args.checkpoint) / "generate")
    out.mkdir(parents=True, exist_ok=True)
    paths = None  # listed (and checked) before minutes of sampling, not after
    if not args.no_metrics:
        folder = test_folder(args, config)
        paths = (dataset.list_images_skipping(folder, skip_bad(args, config)),
                 dataset.list_images_skipping(config["splits"]["train"],
                                              skip_bad(args, config)))
        if len(paths[0]) < 4:
            sys.exit(f"error: the metrics need at least 4 test slices, {folder} has "
                     f"{len(paths[0])}: pass another --test-dir, or --no-metrics.")
    started = time.perf_counter()
    top = {"top_temperature": top_temperature} if two_level else {}
    draw = prior.sampler(args.generate, temperature, args.seed, args.top_k, **top)  # traced once
    traced = time.perf_counter()
    samples = vqvae.decode_all(np.asarray(draw()))
    seconds = time.perf_counter() - traced
    save_samples(out, samples)
    report = {**what_was_drawn(args, prior, top_temperature, temperature),
              "samples": len(samples), "trace_seconds": traced - started, "seconds": seconds,
              "images_per_second": len(samples) / seconds, "device": device()}
    print(f"generated {len(samples)} slices in {seconds:.1f} s: {len(samples) / seconds:.2f} "
          f"images/s on {report['device']} (sampling and decoding; {traced - started:.1f} s "
          f"more to trace the sampler once); wrote {out}/sample_*.png and samples_grid.png",
          flush=True)
    if paths:
        report["metrics"] = generation_metrics(args, prior, vqvae, config, samples, *paths,
                                               out=out)
    write_json(report, out / "generation_report.json")
    print(f"wrote {out / 'generation_report.json'}" + (
        f" and {out / 'samples_and_real.png'}" if paths else ""))


def what_was_drawn(args, prior, top_temperature, temperature):
    """The report's record of the model and the sampler's settings."""
    drawn = {"seed": args.seed, "top_k": args.top_k}
    if isinstance(prior, vqvae2.TwoLevelGenerator):
        return {"checkpoint": str(Path(args.checkpoint)), **drawn,
                "temperature": {"top": top_temperature, "bottom": temperature},
                "code_maps": [list(prior.top_shape), list(prior.bottom_shape)],
                "style_classes": prior.styles.count if prior.styles is not None else 0}
    return {"checkpoint": str(Path(args.checkpoint) / "prior_best.keras"), **drawn,
            "temperature": temperature, "code_map": [prior.grid_size, prior.grid_size]}


def sampling_temperatures(args, two_level):
    """(the top prior's, the (bottom) prior's) from --temperature: one value for both; unless
    given, 1, and a two-level run's vqvae2.TEMPERATURES."""
    given = args.temperature or (vqvae2.TEMPERATURES if two_level else [1.0])
    if len(given) == 2 and not two_level:
        sys.exit(f"error: --temperature {' '.join(map(str, given))}: a train.py run has one "
                 f"prior, so give one temperature (two, TOP BOTTOM, are for a two_level.py run).")
    return vqvae2.top_and_bottom(given)


def load_images(paths, image_size, batch_size):
    with dataset.naming_bad_files(paths):
        return np.concatenate([b.numpy() for b in dataset.load_split(paths, image_size,
                                                                      batch_size)])


def generation_metrics(args, prior, vqvae, config, samples, test_paths, train_paths, out):
    """The measures of metrics.py, each next to its baselines, printed as a table; and
    samples_and_real.png: the first 16 samples above 16 of the real slices they are measured
    against, at the same size.

    Real slices: n test slices (n = samples, at most half the test split), evenly spaced. The
    reconstructions and shuffled codes come from n *other* test slices, so that every realism
    row compares two different sets of equal size, as samples and real slices are.
    """
    size = config["train"]["image_size"]
    test = load_images(test_paths, size, args.batch_size)
    train = load_images(train_paths, size, args.batch_size)
    n = min(len(samples), len(test) // 2)  # at least 2: generate() checked the counts
    picks = np.linspace(0, len(test) - 1, 2 * n).round().astype(int)
    real, samples = test[picks[0::2]], samples[:n]
    shown = 16 if n >= 16 else min(n, 8)  # whole rows of samples, then of real slices
    spread = np.linspace(0, n - 1, shown).round().astype(int)  # across the whole test split
    save_grid(out / "samples_and_real.png", np.concatenate([samples[:shown], real[spread]]),
              columns=min(shown, 8), caption="top: samples; bottom: real")
    result = metrics.sample_report(prior, vqvae, samples, real, test, picks[1::2], train,
                                   args.seed, args.batch_size)
    metrics.print_report(result)
    return result


if __name__ == "__main__":
    main()
