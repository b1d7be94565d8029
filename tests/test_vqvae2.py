"""vqvae2.py: the two-level VQ-VAE, its style classes, and the packing that lets predict.py
measure it; a checkpoint saved before the models moved out of two_level.py still loads."""

from pathlib import Path

import keras
import numpy as np
import pytest

import metrics
import vqvae2
from prior import PixelCNNPrior

FIXTURES = Path(__file__).parent / "fixtures"


def make_model():
    keras.utils.set_random_seed(0)
    return vqvae2.TwoLevelVQVAE(image_size=32, width=8, code_dim=4, codebook_size=16, seed=0)


def make_priors(style_classes=0):
    """Tiny priors for make_model's 4x4 top and 8x8 bottom maps: (top prior, conditioned on a
    1x1 map of `style_classes` classes if any; bottom prior, conditioned on the top map)."""
    styled = dict(condition_grid=1, condition_codebook=style_classes) if style_classes else {}
    top_prior = PixelCNNPrior(grid_size=4, codebook_size=16, width=8, layers=2, kernel_size=3,
                              **styled)
    bottom_prior = PixelCNNPrior(grid_size=8, codebook_size=16, width=8, layers=2,
                                 kernel_size=3, condition_grid=4, condition_codebook=16)
    return top_prior, bottom_prior


def test_two_level_codes_have_both_grids_and_decode_to_the_reconstructions(tmp_path):
    """Encoding gives a top map at 1/8 and a bottom map at 1/4 of the image; decoding them
    gives what the model reconstructs; training steps run and the model loads as saved."""
    model = make_model()
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype("float32")
    top, bottom = (codes.numpy() for codes in model.encode(images))
    assert top.shape == (4, 4, 4) and bottom.shape == (4, 8, 8)
    assert 0 <= top.min() and max(top.max(), bottom.max()) < 16
    np.testing.assert_allclose(model.decode_codes(top, bottom).numpy(), model(images).numpy(),
                               atol=1e-5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.fit(images, epochs=8, batch_size=4, verbose=0).history
    assert np.isfinite(logs["loss"]).all() and logs["loss"][-1] < logs["loss"][0]
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, vqvae2.TwoLevelVQVAE)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)


def test_the_generator_packs_both_levels_and_scores_every_code():
    """Packing and unpacking are inverse; the bits per code are the mean over all codes of
    both levels (the top map's 16 and the bottom map's 64); decode_all decodes packed maps."""
    model = make_model()
    top_prior, bottom_prior = make_priors()
    generator = vqvae2.TwoLevelGenerator(model, top_prior, bottom_prior)
    rng = np.random.default_rng(1)
    top, bottom = rng.integers(0, 16, (3, 4, 4)), rng.integers(0, 16, (3, 8, 8))
    packed = generator.pack(top, bottom)
    assert packed.shape == (3, 16 + 64)
    for given, back in zip((top, bottom), generator.unpack(packed)):
        np.testing.assert_array_equal(given, back)
    top_bits = float(top_prior.bits_per_code(top))
    bottom_bits = float(bottom_prior.bits_per_code(bottom, top))
    assert np.isclose(generator.bits_per_code(packed), (16 * top_bits + 64 * bottom_bits) / 80)
    assert [level.stop - level.start for level in generator.levels] == [16, 64]
    np.testing.assert_allclose(generator.decode_all(packed),
                               model.decode_codes(top, bottom).numpy(), atol=1e-6)
    drawn = generator.sampler(2, seed=0)()
    assert drawn.shape == (2, 80) and drawn.min() >= 0 and drawn.max() < 16


def test_the_top_map_has_its_own_temperature():
    """sampler(..., top_temperature): the top prior draws at it, the bottom prior at
    `temperature` (the same maps as each prior's own sampler with those seeds draws, and not
    those of the other temperature); without it both share `temperature`; top_k reaches
    both priors."""
    model = make_model()
    top_prior, bottom_prior = make_priors()
    generator = vqvae2.TwoLevelGenerator(model, top_prior, bottom_prior)
    top, bottom, _ = generator.unpack(generator.sampler(8, 1.5, 3, top_temperature=0.3)())
    np.testing.assert_array_equal(top, top_prior.sampler(8, 0.3, 3)().numpy())
    assert (top != top_prior.sampler(8, 1.5, 3)().numpy()).any()
    np.testing.assert_array_equal(bottom, bottom_prior.sampler(8, 1.5, 4)(top).numpy())
    assert (bottom != bottom_prior.sampler(8, 0.3, 4)(top).numpy()).any()
    np.testing.assert_array_equal(generator.sampler(8, 1.5, 3, top_temperature=1.5)(),
                                  generator.sampler(8, 1.5, 3)())
    top, bottom, _ = generator.unpack(generator.sampler(8, 1.5, 3, 2, top_temperature=0.3)())
    np.testing.assert_array_equal(top, top_prior.sampler(8, 0.3, 3, 2)().numpy())  # top-k 2
    assert (top != top_prior.sampler(8, 0.3, 3)().numpy()).any()  # top-k made a difference
    np.testing.assert_array_equal(bottom, bottom_prior.sampler(8, 1.5, 4, 2)(top).numpy())
    assert (bottom != bottom_prior.sampler(8, 1.5, 4)(top).numpy()).any()  # in both priors


def test_style_classes():
    """StyleClasses: quantile bins of the training styles, so each bin of brightness (and of
    contrast) holds a quarter of the training slices, brighter slices land in higher
    brightness bins, and draws follow the training frequencies."""
    rng = np.random.default_rng(0)
    train_styles = rng.uniform(0, 1, (400, 2))
    classes = vqvae2.StyleClasses(train_styles, 4)
    train_classes = classes(train_styles)
    assert classes.count == 16 and train_classes.min() >= 0 and train_classes.max() < 16
    np.testing.assert_array_equal(np.bincount(train_classes // 4), [100] * 4)  # brightness
    np.testing.assert_array_equal(np.bincount(train_classes % 4), [100] * 4)  # contrast
    assert list(classes(np.array([[0.01, 0.99], [0.99, 0.01]]))) == [3, 12]
    three = vqvae2.StyleClasses(rng.uniform(0, 1, (400, 3)), 2)  # base-2 digits, 8 classes
    assert three.count == 8 and list(three(np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]]))) == [5, 2]
    tied = np.repeat(rng.uniform(0, 1, (400, 1)), 2, axis=1)  # contrast rises with brightness
    drawn = vqvae2.StyleClasses(tied, 4).draw(4000, np.random.default_rng(1))
    assert set(drawn) == {0, 5, 10, 15}  # the only classes training has: the diagonal
    assert all(abs(np.mean(drawn == c) - 0.25) < 0.03 for c in (0, 5, 10, 15))


def test_a_styled_generator_packs_the_style_and_conditions_the_top_prior_on_it():
    """With StyleClasses the style is packed last, outside both levels (so shuffling codes
    keeps it), the top map's bits depend on it, samples carry drawn styles, and a top prior
    and StyleClasses come together or not at all."""
    model = make_model()
    top_prior, bottom_prior = make_priors(style_classes=4)
    classes = vqvae2.StyleClasses(np.random.default_rng(0).uniform(0, 1, (40, 2)), 2)
    generator = vqvae2.TwoLevelGenerator(model, top_prior, bottom_prior, classes)
    rng = np.random.default_rng(1)
    top, bottom = rng.integers(0, 16, (3, 4, 4)), rng.integers(0, 16, (3, 8, 8))
    packed = generator.pack(top, bottom, np.array([0, 1, 3]))
    assert packed.shape == (3, 16 + 64 + 1) and list(packed[:, -1]) == [0, 1, 3]
    for given, back in zip((top, bottom, [[[0]], [[1]], [[3]]]), generator.unpack(packed)):
        np.testing.assert_array_equal(given, back)
    shuffled = metrics.shuffle_codes(packed, np.random.default_rng(2), generator.levels)
    np.testing.assert_array_equal(shuffled[:, -1], packed[:, -1])
    restyled = generator.pack(top, bottom, np.array([2, 2, 2]))
    assert generator.level_bits(packed)[0] != generator.level_bits(restyled)[0]
    assert generator.level_bits(packed)[1] == generator.level_bits(restyled)[1]
    drawn = generator.sampler(5, seed=0)()
    assert drawn.shape == (5, 81) and set(drawn[:, -1]) <= set(range(4))
    images = model.decode_all(top, bottom)
    encoded = generator.encode_all([images[:2], images[2:]])
    np.testing.assert_array_equal(encoded[:, -1], classes(metrics.brain_styles(images)))
    with pytest.raises(ValueError, match="StyleClasses"):
        vqvae2.TwoLevelGenerator(model, top_prior, bottom_prior)
    unstyled = make_priors()[0]
    with pytest.raises(ValueError, match="StyleClasses"):
        vqvae2.TwoLevelGenerator(model, unstyled, bottom_prior, classes)


def test_a_checkpoint_saved_before_the_move_out_of_two_level_py_loads():
    """tests/fixtures holds a tiny TwoLevelVQVAE saved by two_level.py before the models moved
    to vqvae2.py (its config names the module two_level): it loads by its registered name as a
    vqvae2.TwoLevelVQVAE and reconstructs as it did when saved."""
    path = FIXTURES / "two_level_vqvae_saved_from_two_level_py.keras"
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, vqvae2.TwoLevelVQVAE)
    images = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype("float32")
    expected = np.load(FIXTURES / "two_level_vqvae_saved_from_two_level_py_outputs.npy")
    np.testing.assert_allclose(loaded(images).numpy(), expected, atol=1e-6)
