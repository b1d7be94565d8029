"""OASIS brain MRI slices (or any folder of PNG/JPEG slices) as tf.data pipelines.

The OASIS preprocessed download unpacks to

    keras_png_slices_data/
        keras_png_slices_train/      9,664 slices  -> used for training
        keras_png_slices_validate/   1,120 slices  -> per-epoch metrics, checkpoint selection
        keras_png_slices_test/         544 slices  -> predict.py only
        keras_png_slices_seg_*/      segmentation masks, never used as images

Each split becomes: sorted files -> decode to one channel -> fit into image_size x image_size
(aspect ratio kept, zero padded) -> uint8, cached in memory (decoded once) -> float32 in [0, 1]
-> shuffle (training only) -> batch -> prefetch.

`python dataset.py prepare --oasis1 PATH...` builds this layout from the official OASIS-1 release
(its disc tarballs or folders): see oasis1.py.
"""

import contextlib
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

SPLITS = ("train", "validate", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DECODABLE = ("PNG", "JPEG")  # what tf.io.decode_image reads as one channel (not GIF, BMP)
OASIS_HELP = ("Expected the OASIS layout: a folder holding keras_png_slices_train/, "
              "keras_png_slices_validate/ and keras_png_slices_test/, as unpacked from "
              "keras_png_slices_data.zip (the preprocessed OASIS-1 slices, "
              "https://www.oasis-brains.org; see the README), or give the split folders with "
              "--train-dir/--val-dir/--test-dir.")


class DataError(ValueError):
    """Bad input data; the message names the path and says what to do."""


def oasis_split_dirs(root, need_test=True):
    """{'train': Path, 'validate': Path, 'test': Path} under an OASIS root.

    Accepts the keras_png_slices_data folder itself or the folder that contains it. With
    need_test=False a missing test split is allowed and given as None.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. {OASIS_HELP}")
    if (root / "keras_png_slices_data").is_dir():
        root = root / "keras_png_slices_data"
    if root.name.startswith("keras_png_slices_") and root.name != "keras_png_slices_data":
        raise DataError(f"{root} is one split folder: pass the folder that holds all the "
                        f"splits (its parent, {root.parent}).")
    dirs = {split: root / f"keras_png_slices_{split}" for split in SPLITS}
    if not need_test and not dirs["test"].is_dir():
        dirs["test"] = None
    missing = [str(path) for path in dirs.values() if path and not path.is_dir()]
    if missing:
        raise DataError(f"{root} is missing {', '.join(missing)}. {OASIS_HELP}")
    return dirs


def list_images(folder, skipped=None):
    """Sorted image paths in `folder`; every file is checked to be a readable image.

    Other files and sub-folders are ignored. A bad image raises DataError naming it, unless
    `skipped` is a list: then it is left out and "path (what is wrong)" appended there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: pass a folder of PNG or JPEG "
                        f"slices. {OASIS_HELP}")
    if "_seg_" in folder.name:
        raise DataError(f"{folder} holds OASIS segmentation masks, not MRI slices: use the "
                        f"matching keras_png_slices_<split> folder instead.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.is_dir())
    good = []
    for path in paths:
        problem = image_problem(path)
        if problem is None:
            good.append(str(path))
        elif skipped is not None:
            skipped.append(f"{path} ({problem})")
        else:
            raise DataError(f"{path} {problem}. Remove or replace it, or pass --skip-bad-files "
                            f"to train without it.")
    if not good:
        bad = f" (all {len(paths)} are bad: {'; '.join(skipped[-3:])})" if paths else ""
        raise DataError(f"{folder} holds no readable .png/.jpg/.jpeg images{bad}: check the "
                        f"path, or that the download was fully unpacked.")
    return good


def list_images_skipping(folder, skip_bad, skipped=None):
    """list_images; with skip_bad, bad files are left out, announced (how many, and the first
    few) and appended to `skipped`, a list, if given."""
    if not skip_bad:
        return list_images(folder)
    left_out = []
    paths = list_images(folder, left_out)
    if left_out:
        print(f"--skip-bad-files: left out {len(left_out)} bad file(s) in {folder}: "
              + "; ".join(left_out[:3]) + (" ..." if len(left_out) > 3 else ""), flush=True)
    if skipped is not None:
        skipped.extend(left_out)
    return paths


def image_problem(path):
    """What makes `path` unusable as a slice, or None if it decodes: a broken link, an empty
    file, something that is not an image, a damaged image, or a kind TensorFlow cannot read."""
    if not path.exists():
        return f"is a broken link (to {os.readlink(path)}, which does not exist)"
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        with Image.open(path) as image:
            kind, mode = image.format, image.mode
            if kind == "PNG":
                image.verify()  # checks every chunk's checksum, without decoding
            else:
                image.load()  # other formats have no such check: decode in full
    except Exception as error:
        return f"is not a readable image ({error})"
    if kind not in DECODABLE or mode == "CMYK":
        return (f"is a {kind} image in {mode} mode, which the pipeline cannot decode (convert "
                f"it to a grayscale or RGB PNG)")
    return None


@contextlib.contextmanager
def naming_bad_files(paths):
    """Turns a decode error inside a tf.data pipeline over `paths` into a DataError that names
    the file (tf.data's errors do not say which element failed; only then are they searched)."""
    try:
        yield
    except tf.errors.InvalidArgumentError:
        for path in paths:
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
            except tf.errors.InvalidArgumentError:
                raise DataError(f"{path} could not be decoded: remove or replace it and run "
                                f"again.") from None
        raise


def decode_and_fit(path, image_size):
    """Read one file -> (image_size, image_size, 1) uint8, aspect kept, centred on black.

    Any bit depth or colour type is accepted: RGB/RGBA become grayscale, 16-bit is rescaled.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=1, dtype=tf.float32,
                               expand_animations=False)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    scale = image_size / tf.cast(tf.maximum(height, width), tf.float32)
    new_size = tf.cast(tf.round(tf.cast([height, width], tf.float32) * scale), tf.int32)
    new_size = tf.maximum(new_size, 1)
    # antialiased bilinear: a proper low-pass when shrinking, smooth when enlarging
    resize = lambda: tf.image.resize(image, new_size, method="bilinear", antialias=True)
    image = tf.cond(tf.reduce_all(new_size == [height, width]), lambda: image, resize)
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def load_split(paths, image_size=256, batch_size=32, shuffle=False, seed=0,
               drop_remainder=False):
    """Paths from `list_images` -> batches of float32 images (B, image_size, image_size, 1)
    in [0, 1]; with drop_remainder, whole batches only."""
    dataset = (tf.data.Dataset.from_tensor_slices(paths)
               .map(lambda p: decode_and_fit(p, image_size), num_parallel_calls=tf.data.AUTOTUNE)
               .cache())
    if shuffle:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return (dataset.map(lambda x: tf.cast(x, tf.float32) / 255.0)
            .batch(batch_size, drop_remainder=drop_remainder)
            .prefetch(tf.data.AUTOTUNE))


def fixed_batch(paths, image_size, count):
    """`count` images spread evenly over a split's paths, as float32 (count, S, S, 1) in [0, 1].

    Used for the progress GIF, for comparisons, and to estimate the pixel variance."""
    picks = np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int)
    images = []
    for i in picks:
        try:
            images.append(decode_and_fit(paths[i], image_size))
        except tf.errors.InvalidArgumentError as error:
            raise DataError(f"{paths[i]} could not be decoded ({error.message.splitlines()[0]})."
                            f" Remove or replace the file and run again.") from None
    return np.stack(images).astype("float32") / 255.0


# ---------------------------------------------------------------------------------------------
# A demo stand-in for OASIS, so `python train.py` runs on a fresh clone with no download.

DEMO_COUNTS = {"train": 1200, "validate": 120, "test": 120}


def build_demo_dataset(root, seed=0, image_size=256, counts=None):
    """Write an OASIS-layout folder of augmented axial slices of the MNI152 T1 template.

    The template (1 mm, skull-stripped) ships inside the nilearn package, so nothing is
    downloaded. Axial levels are split by z (z % 10 == 3 -> validate, == 7 -> test), and every
    slice gets its own random affine warp, smooth elastic warp and intensity jitter. It is one
    brain, not a population: a stand-in to try the pipeline, never a substitute for OASIS.
    """
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    volume = load_mni152_template(resolution=1).get_fdata().astype(np.float32)
    levels = {"train": [], "validate": [], "test": []}
    for z in range(30, 141):
        levels["validate" if z % 10 == 3 else "test" if z % 10 == 7 else "train"].append(z)
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (counts or DEMO_COUNTS).items():
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            # RAS volume -> anterior at the top, the subject's left on the image's right (as
            # radiologists view it, and as `python dataset.py prepare` writes OASIS-1)
            axial = np.fliplr(np.rot90(volume[:, :, rng.choice(levels[split])]))
            slice_ = _augment(axial, rng, ndimage)
            Image.fromarray(_fit_to_canvas(slice_, image_size)).save(folder / f"demo_{i:04d}.png")
    return root


def _augment(image, rng, ndimage):
    """Random rotation/scale/shift, a smooth elastic warp, then gamma and contrast jitter."""
    h, w = image.shape
    angle, zoom = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.88, 1.12)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / zoom
    centre = np.array([h, w]) / 2
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows, cols]).reshape(2, -1) - centre[:, None]
    coords = rotation @ coords + centre[:, None] + rng.uniform(-8, 8, size=(2, 1))
    for axis in range(2):  # elastic: Gaussian-smoothed random displacements, up to a few mm
        field = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma=12)
        coords[axis] += (field / (np.abs(field).max() + 1e-8) * rng.uniform(1, 5)).ravel()
    warped = ndimage.map_coordinates(image, coords, order=1, mode="constant").reshape(h, w)
    warped = np.clip(warped, 0, 1) ** rng.uniform(0.75, 1.3) * rng.uniform(0.85, 1.1)
    return np.clip(warped, 0, 1)


def _fit_to_canvas(image, size):
    """Float image in [0, 1] -> uint8 (size, size), long side resized to size, centred on black."""
    h, w = image.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = Image.fromarray((image * 255).astype(np.uint8)).resize((new_w, new_h),
                                                                     Image.BICUBIC)
    canvas = Image.new("L", (size, size))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["prepare"]:
        sys.exit("usage: python dataset.py prepare --oasis1 PATH... [--out FOLDER] ...: builds "
                 "the OASIS slice folders from the OASIS-1 release (prepare --help: the flags).")
    import oasis1  # only here: training never needs nibabel

    oasis1.main(sys.argv[2:])
