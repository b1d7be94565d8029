"""Shared fixtures: small slice folders written at test time, and one tiny training run."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

# two logical CPU devices, so that tests/test_distribute.py can run a MirroredStrategy with two
# replicas on a machine without GPUs (this must happen before TensorFlow starts its devices;
# one-device code still runs on the first)
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

BRAIN_SLICES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brain-slices"
TINY = ["--purpose", "reconstruct", "--image-size", "32", "--width", "8", "--code-dim", "4",
        "--codebook-size", "16", "--batch-size", "8", "--precision", "float32",
        "--progress-images", "3", "--prior-epochs", "2", "--prior-width", "8", "--prior-layers", "2", "--prior-kernel", "3",
        "--prior-batch-size", "8"]


def tiny_experiment(tmp_path):
    """two_level.py's flags for a tiny run on folders of 32-px slices written here."""
    train_dir = write_slices(tmp_path / "train", 16, seed=0, size=32)
    val_dir = write_slices(tmp_path / "validate", 8, seed=1, size=32)
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir),
            "--out", str(tmp_path / "out"), "--image-size", "32", "--width", "8",
            "--code-dim", "4", "--codebook-size", "16", "--batch-size", "8",
            "--top-prior", "8", "2", "3", "--bottom-prior", "8", "2", "3"]


def fake_slice(rng, size=40):
    """A bright ellipse with texture on a black background, a little like a brain slice."""
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    inside = (rows / rng.uniform(0.3, 0.45)) ** 2 + (cols / rng.uniform(0.25, 0.4)) ** 2 < 1
    texture = 0.6 + 0.3 * np.sin(rows * rng.uniform(10, 30)) * np.cos(cols * 20)
    return (inside * texture * 255).astype(np.uint8)


def write_slices(folder, count, seed=0, size=40):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(fake_slice(rng, size)).save(folder / f"slice_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def oasis_root(tmp_path_factory):
    """keras_png_slices_data/ with train/validate/test and segmentation folders beside them."""
    root = tmp_path_factory.mktemp("oasis") / "keras_png_slices_data"
    for seed, (split, count) in enumerate({"train": 24, "validate": 8, "test": 6}.items()):
        write_slices(root / f"keras_png_slices_{split}", count, seed)
        write_slices(root / f"keras_png_slices_seg_{split}", 2, seed + 10)
    return root


@pytest.fixture(scope="session")
def trained_run(oasis_root, tmp_path_factory):
    """A 2-epoch tiny train.py run (32x32 images, 16 codes) shared by the train/predict tests."""
    import train

    out = tmp_path_factory.mktemp("run") / "out"
    train.main(["--data", str(oasis_root), "--epochs", "2", "--out", str(out), *TINY])
    return out


@pytest.fixture(autouse=True)
def float32_policy():
    """train.main sets a global dtype policy; keep each test independent of the last."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
