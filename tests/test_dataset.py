from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from conftest import BRAIN_SLICES, write_slices


def first_batch(paths, **kwargs):
    return next(iter(dataset.load_split(paths, **kwargs))).numpy()


def test_oasis_layout_finds_the_three_image_splits_not_the_segmentations(oasis_root):
    for root in (oasis_root, oasis_root.parent):  # keras_png_slices_data itself or its parent
        dirs = dataset.oasis_split_dirs(root)
        assert {split: path.name for split, path in dirs.items()} == {
            "train": "keras_png_slices_train", "validate": "keras_png_slices_validate",
            "test": "keras_png_slices_test"}
    assert len(dataset.list_images(dirs["train"])) == 24


def test_a_missing_test_split_is_allowed_only_when_asked(oasis_root, tmp_path):
    root = tmp_path / "no_test"
    for split in ("train", "validate"):
        write_slices(root / f"keras_png_slices_{split}", 2)
    assert dataset.oasis_split_dirs(root, need_test=False)["test"] is None
    with pytest.raises(dataset.DataError, match="keras_png_slices_test"):
        dataset.oasis_split_dirs(root)


def test_pipeline_yields_scaled_float_batches_in_sorted_order(oasis_root):
    paths = dataset.list_images(oasis_root / "keras_png_slices_validate")
    assert paths == sorted(paths)
    batches = list(dataset.load_split(paths, image_size=32, batch_size=5))
    assert [b.shape[0] for b in batches] == [5, 3]
    images = np.concatenate([b.numpy() for b in batches])
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.5
    again = np.concatenate([b.numpy() for b in dataset.load_split(paths, 32, 5)])
    np.testing.assert_array_equal(images, again)  # validation is never shuffled


def test_only_the_training_split_is_shuffled(oasis_root):
    paths = dataset.list_images(oasis_root / "keras_png_slices_train")
    shuffled = dataset.load_split(paths, image_size=32, batch_size=24, shuffle=True, seed=1)
    epoch1, epoch2 = (next(iter(shuffled)).numpy() for _ in range(2))
    ordered = first_batch(paths, image_size=32, batch_size=24)
    assert not np.array_equal(epoch1, ordered) and not np.array_equal(epoch1, epoch2)
    # same images, new order: the sorted per-image sums agree
    np.testing.assert_allclose(np.sort(epoch1.sum((1, 2, 3))), np.sort(ordered.sum((1, 2, 3))),
                               rtol=1e-6)


def test_aspect_ratio_is_kept_and_the_image_padded(tmp_path):
    wide = np.full((20, 40), 200, np.uint8)  # 2:1 -> 32 x 16 band in a 32 x 32 square
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = first_batch([str(tmp_path / "wide.png")], image_size=32)[0, ..., 0]
    assert np.all(image[:8] == 0) and np.all(image[-8:] == 0)
    np.testing.assert_allclose(image[9:23], 200 / 255, atol=1 / 255)


def test_rgb_rgba_16_bit_and_jpeg_images_are_converted(tmp_path):
    gray = np.full((32, 32), 128, np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "a_rgb.png")
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(tmp_path / "b_rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "c_16bit.png")
    Image.fromarray(gray).save(tmp_path / "d_gray.jpg", quality=95)
    images = first_batch(dataset.list_images(tmp_path), image_size=32, batch_size=4)
    assert images.shape == (4, 32, 32, 1)
    np.testing.assert_allclose(images, 128 / 255, atol=2 / 255)


def test_fixed_batch_spreads_over_the_split(oasis_root):
    paths = dataset.list_images(oasis_root / "keras_png_slices_train")
    batch = dataset.fixed_batch(paths, 32, 4)
    everything = first_batch(paths, image_size=32, batch_size=24)
    np.testing.assert_array_equal(batch, everything[[0, 8, 15, 23]])


@pytest.mark.parametrize("make_problem, expected", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: write_slices(root / "only_train" / "keras_png_slices_train", 2).parent,
     "keras_png_slices_validate"),
])
def test_bad_oasis_roots_name_the_path_and_the_expected_layout(tmp_path, make_problem, expected):
    root = make_problem(tmp_path)
    with pytest.raises(dataset.DataError, match=expected) as error:
        dataset.oasis_split_dirs(root)
    assert str(root) in str(error.value) and "keras_png_slices_train/" in str(error.value)


def test_empty_split_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(dataset.DataError, match="empty.*no readable .png/.jpg/.jpeg images"):
        dataset.list_images(tmp_path / "empty")


@pytest.mark.parametrize("content", [b"this is not a png", None])
def test_unreadable_image_is_named(tmp_path, content):
    folder = write_slices(tmp_path / "split", 3)
    bad = folder / "slice_001.png"
    bad.write_bytes(content if content else bad.read_bytes()[:60])  # garbage, or truncated
    with pytest.raises(dataset.DataError, match="slice_001.png is not a readable image"):
        dataset.list_images(folder)


def test_segmentation_folder_is_refused(oasis_root):
    with pytest.raises(dataset.DataError, match="segmentation masks"):
        dataset.list_images(oasis_root / "keras_png_slices_seg_train")


def test_demo_set_is_oasis_shaped_and_deterministic_for_a_seed(tmp_path):
    counts = {"train": 3, "validate": 2, "test": 2}
    first = dataset.build_demo_dataset(tmp_path / "a", seed=4, image_size=64, counts=counts)
    second = dataset.build_demo_dataset(tmp_path / "b", seed=4, image_size=64, counts=counts)
    other = dataset.build_demo_dataset(tmp_path / "c", seed=5, image_size=64, counts=counts)
    dirs = dataset.oasis_split_dirs(first)
    assert [len(dataset.list_images(d)) for d in dirs.values()] == [3, 2, 2]
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)
    image = np.asarray(Image.open(first / files[0]))
    assert image.shape == (64, 64) and image.max() > 100 and image[0, 0] == 0  # brain on black


@pytest.mark.skipif(not BRAIN_SLICES.is_dir(), reason="../shared/data/brain-slices is absent")
def test_real_brain_slices_load_at_full_size():
    paths = dataset.list_images(BRAIN_SLICES / "validate")
    assert len(paths) == 510
    images = first_batch(paths, image_size=256, batch_size=16)
    assert images.shape == (16, 256, 256, 1)
    assert 0.05 < images.mean() < 0.5 and images[:, 0, 0].max() == 0.0  # black corners


@pytest.mark.parametrize("save, expected", [
    (lambda path: Image.new("L", (8, 8)).save(path, format="WEBP"), "WEBP image"),
    (lambda path: Image.new("CMYK", (8, 8)).save(path, format="JPEG"), "CMYK mode"),
])
def test_formats_tensorflow_cannot_decode_are_named(tmp_path, save, expected):
    folder = write_slices(tmp_path / "split", 2)
    save(folder / "slice_001.png")
    with pytest.raises(dataset.DataError, match=f"slice_001.png is a .*{expected}"):
        dataset.list_images(folder)


def test_a_decode_failure_inside_the_pipeline_names_the_file(tmp_path):
    folder = write_slices(tmp_path / "split", 3)
    paths = dataset.list_images(folder)
    (folder / "slice_002.png").write_bytes(b"corrupted after the check")
    with pytest.raises(dataset.DataError, match="slice_002.png could not be decoded"):
        with dataset.naming_bad_files(paths):
            list(dataset.load_split(paths, image_size=32))


def test_a_split_folder_given_as_the_root_points_to_its_parent(oasis_root):
    with pytest.raises(dataset.DataError, match="one split folder: pass the folder that holds"):
        dataset.oasis_split_dirs(oasis_root / "keras_png_slices_train")


# --- bad and unusual files: each bad one is named before training; the rest just work -------

def brain_like(mode="L", size=(40, 40)):
    """A bright disc on black in the given PIL mode."""
    rows, cols = np.mgrid[:size[1], :size[0]]
    disc = ((rows - size[1] / 2) ** 2 + (cols - size[0] / 2) ** 2 < (min(size) / 3) ** 2)
    return Image.fromarray((disc * 200).astype(np.uint8)).convert(mode)


def truncated_png(path):
    brain_like().save(path)
    path.write_bytes(path.read_bytes()[:60])


def text_file(path):
    path.write_text("this is not an image\n")


def broken_link(path):
    path.symlink_to(path.with_name("gone.png"))


def cmyk_jpeg(path):
    brain_like().convert("CMYK").save(path, format="JPEG")


@pytest.mark.parametrize("make, problem", [
    (truncated_png, "is not a readable image"),
    (lambda path: path.write_bytes(b""), "is empty"),
    (text_file, "is not a readable image"),
    (broken_link, "is a broken link"),
    (cmyk_jpeg, "the pipeline cannot decode"),
    (lambda path: brain_like().save(path, format="GIF"), "is a GIF image"),
])
def test_each_bad_file_is_named_with_what_to_do_or_skipped_and_listed(tmp_path, make, problem):
    folder = write_slices(tmp_path / "split", 2)
    bad = folder / "bad slice é.png"
    make(bad)
    with pytest.raises(dataset.DataError) as error:
        dataset.list_images(folder)
    assert str(bad) in str(error.value) and problem in str(error.value)
    assert "Remove or replace it, or pass --skip-bad-files" in str(error.value)
    skipped = []
    assert dataset.list_images(folder, skipped) == [str(folder / "slice_000.png"),
                                                    str(folder / "slice_001.png")]
    assert len(skipped) == 1 and skipped[0].startswith(str(bad)) and problem in skipped[0]
    for good in folder.glob("slice_*.png"):
        good.unlink()
    with pytest.raises(dataset.DataError, match="holds no readable .*all 1 are bad: .*" + problem):
        dataset.list_images(folder, [])


@pytest.mark.parametrize("name, save", [
    ("jpeg named.png", lambda path: brain_like().save(path, format="JPEG", quality=95)),
    ("sixteen_bit.png", lambda path: Image.fromarray(
        np.asarray(brain_like(), np.uint16) * 257).save(path)),
    ("rgba.png", lambda path: brain_like("RGBA").save(path)),
    ("palette.png", lambda path: brain_like("P").save(path)),
    ("one_bit.png", lambda path: brain_like("1").save(path)),
    ("tall and narrow.png", lambda path: brain_like(size=(20, 50)).save(path)),
    ("naïve ü 脑.png", lambda path: brain_like().save(path)),
])
def test_unusual_but_valid_images_are_read_as_grayscale_slices(tmp_path, name, save):
    folder = tmp_path / "split"
    folder.mkdir()
    save(folder / name)
    paths = dataset.list_images(folder)
    image = first_batch(paths, image_size=32)[0, ..., 0]
    assert image.shape == (32, 32) and image[16, 16] > 0.5 and image[0, 0] == 0  # disc on black


def test_other_files_and_sub_folders_in_a_split_are_ignored(tmp_path):
    folder = write_slices(tmp_path / "split", 2)
    (folder / "notes.txt").write_text("scan notes")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "extra").mkdir()
    write_slices(folder / "extra", 1)
    (folder / "looks_like.png").mkdir()
    assert [Path(p).name for p in dataset.list_images(folder)] == ["slice_000.png",
                                                                  "slice_001.png"]


def test_one_bad_file_among_thousands_is_found_and_named(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    png = (write_slices(tmp_path / "one", 1) / "slice_000.png").read_bytes()
    for i in range(2000):
        (folder / f"slice_{i:05d}.png").write_bytes(png)
    truncated_png(folder / "slice_01234.png")
    with pytest.raises(dataset.DataError, match="slice_01234.png is not a readable image"):
        dataset.list_images(folder)
