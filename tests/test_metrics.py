import numpy as np
import pytest
import tensorflow as tf
from scipy import linalg

import dataset
import metrics
from conftest import BRAIN_SLICES, fake_slice


def slices(count, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return np.stack([fake_slice(rng, size) for _ in range(count)])[..., None].astype(
        "float32") / 255


def test_unigram_bits_is_the_cross_entropy_of_smoothed_training_frequencies():
    train = np.array([[0, 0, 0, 1]])  # counts 3, 1, 0 -> add-one: 4, 2, 1 of 7
    test = np.array([[0, 2]])
    expected = -(np.log2(4 / 7) + np.log2(1 / 7)) / 2
    assert metrics.unigram_bits(train, test, 3) == pytest.approx(expected)
    uniform = np.arange(64).reshape(1, 8, 8) % 4
    assert metrics.unigram_bits(uniform, uniform, 4) == pytest.approx(2.0)


def test_frechet_distance_matches_the_scipy_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) * 1.5 + 0.3
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((mean_a - mean_b) ** 2)
                + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9
    mean_term, trace_term = metrics.frechet_terms(a, b)
    assert mean_term == pytest.approx(np.sum((mean_a - mean_b) ** 2), rel=1e-9)
    assert mean_term + trace_term == pytest.approx(expected, rel=1e-6) and trace_term > 0
    shifted_term, shifted_trace = metrics.frechet_terms(a, a + 0.3)  # same spread, moved
    assert shifted_term == pytest.approx(5 * 0.3**2) and abs(shifted_trace) < 1e-9


def test_brain_styles_are_each_slice_brain_mean_and_standard_deviation():
    """brain_styles: the mean and standard deviation of the pixels above the brain threshold
    (0, 0 for a black slice)."""
    image = np.zeros((1, 8, 8, 1), np.float32)
    image[0, :2, :2] = [[[0.04], [0.4]], [[0.6], [0.8]]]  # 0.04: background, not brain
    styles = metrics.brain_styles(np.concatenate([image, np.zeros_like(image)]))
    np.testing.assert_allclose(styles, [[0.6, np.std([0.4, 0.6, 0.8])], [0, 0]], atol=1e-6)


def test_brain_intensity_averages_the_brain_pixels_and_ignores_background_and_blanks():
    slices = np.zeros((3, 8, 8, 1), np.float32)
    slices[0, 2:6, 2:6] = 0.5                          # a brain of 0.5 on a black background
    slices[1, 2:6, 2:6], slices[1, 3, 3] = 0.8, 0.03   # a pixel below the threshold is out
    assert metrics.brain_intensity(slices) == pytest.approx((0.5 + 0.8) / 2)  # blank skipped
    assert metrics.brain_intensity(slices[2:]) == 0.0


def test_brain_histogram_gives_the_fractions_of_brain_pixels_per_intensity_bin():
    slices = np.zeros((3, 8, 8, 1), np.float32)
    slices[0, 2:6, 2:6] = 0.1                          # 16 brain pixels: 12 dark, 4 at 1.0
    slices[0, 2, 2:6] = 1.0                            # (1.0 and above: the last bin)
    slices[1, 2:6, 2:6], slices[1, 3, 3] = 0.5, 0.03   # 15 mid-grey, one below the threshold
    assert metrics.INTENSITY_BINS[0] == metrics.BRAIN_THRESHOLD
    np.testing.assert_allclose(metrics.brain_histogram(slices),
                               [(0.75 + 0) / 2, 0, 0, (0 + 1) / 2, 0, (0.25 + 0) / 2])
    assert metrics.brain_histogram(slices[2:]) == [0.0] * 6  # no brain anywhere
    assert metrics.brain_histogram(slices, bins=(0.05, 0.5, 1.0)) == [0.375, 0.625]
    slices[1, 2, 2] = 1.5  # out of range, still counted: the fractions keep summing to 1
    assert metrics.brain_histogram(slices[1:2])[-1] == pytest.approx(1 / 15)


def test_dark_islands_count_the_dark_spots_the_brain_encloses():
    """A square brain of 40 x 40 pixels at 0.7: three dark 2x2 spots inside count, and a dark
    hole below the brain threshold (a ventricle), but not a 1-pixel spot (too small), nor a
    dark sulcus that opens onto the background, nor a spot beside it that it reaches, nor a
    dark notch at the image's edge; an empty slice is left out of the mean."""
    slices = np.zeros((3, 64, 64, 1), np.float32)
    slices[:2, 10:50, 10:50] = 0.7
    for row, col in ((15, 15), (15, 40), (40, 20)):
        slices[0, row:row + 2, col:col + 2] = 0.3          # islands of 4 pixels
    slices[0, 30:34, 30:34] = 0.0                          # a ventricle, darker than the background
    slices[0, 25, 25] = 0.1                                # too small
    slices[0, 10:28, 44] = 0.3                             # a sulcus from the edge ...
    slices[0, 27:29, 45:47] = 0.2                          # ... and a spot it touches
    slices[1, 0:50, 30:50] = 0.7                           # a brain reaching the image's edge,
    slices[1, 0:3, 35:37] = 0.3                            # with a dark notch there: not enclosed
    rate = 4 / (40 * 40) * 10_000
    assert metrics.dark_islands(slices[:1]) == pytest.approx(rate)
    assert metrics.dark_islands(slices[1:]) == 0.0          # a smooth brain, and an empty slice
    assert metrics.dark_islands(slices) == pytest.approx(rate / 2)
    assert metrics.dark_islands(slices[:1], min_pixels=1) == pytest.approx(5 / 1600 * 10_000)
    assert metrics.dark_islands(slices[:1], threshold=0.25) == pytest.approx(2 / 1600 * 10_000)


def test_pairwise_ms_ssim_is_one_for_copies_and_lower_for_different_slices():
    same = np.repeat(slices(1), 4, axis=0)
    assert metrics.mean_pairwise_ms_ssim(same) == pytest.approx(1.0, abs=1e-5)
    assert metrics.mean_pairwise_ms_ssim(slices(4)) < 0.95


def test_nearest_training_ssim_finds_a_copied_slice():
    train = slices(30, seed=1)
    queries = np.concatenate([train[17:18], slices(1, seed=2)])
    best, index = metrics.nearest_training_ssim(queries, train, candidates=5)
    assert best[0] == pytest.approx(1.0, abs=1e-5) and index[0] == 17
    assert best[1] < 0.99


def test_feature_network_is_deterministic_and_separates_noise_from_slices():
    images = slices(40, seed=3)
    first = metrics.feature_network(seed=0).predict(images, verbose=0)
    again = metrics.feature_network(seed=0).predict(images, verbose=0)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (40, 192)
    other = slices(40, seed=4)
    noise = np.random.default_rng(5).uniform(size=images.shape).astype("float32")
    network = metrics.feature_network(seed=0)
    features = {name: network.predict(x, verbose=0) for name, x in
                (("other", other), ("noise", noise))}
    assert (metrics.frechet_distance(first, features["other"])
            < 0.1 * metrics.frechet_distance(first, features["noise"]))


@pytest.mark.skipif(not BRAIN_SLICES.is_dir(), reason="../shared/data/brain-slices is absent")
def test_on_real_slices_a_copy_is_found_and_real_brains_are_far_from_noise():
    paths = dataset.list_images(BRAIN_SLICES / "validate")[:40]
    real = dataset.fixed_batch(paths, 256, 40)
    best, index = metrics.nearest_training_ssim(real[[7, 35]], real[:32])
    assert index[0] == 7 and best[0] == pytest.approx(1.0, abs=1e-5)
    assert best[1] < 0.99  # slice 35 is not among the 32 "training" slices
    assert 0.2 < metrics.mean_pairwise_ms_ssim(real[:6]) < 0.99


def test_ms_ssim_on_small_images_uses_fewer_scales_with_weights_summing_to_one():
    a, b = slices(1, seed=6, size=32), slices(1, seed=7, size=32)
    w = metrics.MS_SSIM_WEIGHTS[:2]  # 32 px fits two scales: 32 and 16
    ours = metrics.ms_ssim(a, b)[0]
    by_hand = tf.image.ssim_multiscale(a, b, 1.0, power_factors=[w[0] / sum(w), w[1] / sum(w)],
                                       filter_size=11).numpy()[0]
    raw = tf.image.ssim_multiscale(a, b, 1.0, power_factors=list(w), filter_size=11).numpy()[0]
    assert ours == pytest.approx(by_hand, abs=1e-6) and ours < raw < 1  # raw weights inflate
    with pytest.raises(ValueError, match="at least 11 pixels"):
        metrics.ms_ssim(a[:, :8, :8], b[:, :8, :8])


def test_position_unigram_bits_by_hand_and_against_the_plain_unigram():
    # 2 training maps of 1x2: position 0 saw codes 0, 0; position 1 saw 1, 2 (K = 3)
    train, test = np.array([[[0, 1]], [[0, 2]]]), np.array([[[0, 1]]])
    unigram = np.array([3, 2, 2]) / 7  # add-one smoothed global counts 2, 1, 1
    # the strength that leave-one-out picks: each training code scored without itself
    loo = [-np.mean(np.log2((np.array([1, 0, 1, 0]) + a * unigram[[0, 1, 0, 2]]) / (1 + a)))
           for a in (0.01, 0.1, 1.0)]
    strength = (0.01, 0.1, 1.0)[int(np.argmin(loo))]
    expected = -np.mean(np.log2((np.array([2, 1]) + strength * unigram[[0, 1]]) / (2 + strength)))
    assert metrics.position_unigram_bits(train, test, 3, strengths=(0.01, 0.1, 1.0)) == \
        pytest.approx(expected)
    # codes fixed by position (uniform overall): ~0 bits per position, log2 K for the unigram
    maps = np.tile(np.arange(16).reshape(1, 4, 4), (50, 1, 1))
    assert metrics.position_unigram_bits(maps, maps[:5], 16) < 0.05
    assert metrics.unigram_bits(maps, maps[:5], 16) == pytest.approx(4.0, abs=0.01)


def test_pairwise_ms_ssim_draws_from_the_whole_set_not_its_first_images():
    """A set sorted so that its first 16 images are copies of one slice, the rest all
    different: the first 16 alone would score 1."""
    images = np.concatenate([np.repeat(slices(1, seed=8), 16, axis=0), slices(16, seed=9)])
    assert metrics.mean_pairwise_ms_ssim(images[:16], max_images=16) == pytest.approx(1.0)
    drawn = metrics.mean_pairwise_ms_ssim(images, max_images=16)
    assert drawn < 0.9
    assert metrics.mean_pairwise_ms_ssim(images, max_images=16) == drawn  # the same draw


def test_standardised_brains_take_out_brightness_and_contrast_but_keep_the_anatomy():
    rng = np.random.default_rng(0)
    slices = np.zeros((2, 16, 16, 1), np.float32)
    slices[:, 3:13, 3:13] = rng.uniform(0.3, 0.7, (2, 10, 10, 1))
    brighter = slices * 1.3 + np.where(slices > 0, 0.05, 0)  # more contrast, more light
    standard = metrics.standardised_brains(slices)
    brain = standard[0] > 0
    assert standard[0][brain].mean() == pytest.approx(0.5, abs=1e-5)
    assert standard[0][brain].std() == pytest.approx(0.25, abs=1e-5)
    assert np.all(standard[:, :3] == 0)  # the background stays black
    np.testing.assert_allclose(metrics.standardised_brains(brighter), standard, atol=1e-5)
    assert not np.allclose(standard[0], standard[1])  # different anatomy stays different
    assert np.all(slices[:, :3] == 0) and slices.max() <= 0.7  # the input is not changed
    edge = np.zeros((3, 8, 8, 1), np.float32)
    edge[0, :4], edge[0, 4:, :], edge[0, 4, 0] = 0.6, 0.62, 0.1  # a pixel far below the rest
    edge[1, 2:6, 2:6] = 0.4                                          # a brain of one grey
    edge[2, 0, 0] = 0.03                                              # no brain at all
    standard = metrics.standardised_brains(edge)
    assert standard[0, 4, 0] == 0 and standard[0].max() <= 1  # clipped like the background
    np.testing.assert_allclose(standard[1][edge[1] > 0], 0.5)  # no spread: the middle grey
    np.testing.assert_array_equal(standard[2], edge[2])        # nothing to standardise


def test_shuffled_codes_and_baselines_keep_the_levels_of_a_packed_map_apart():
    """A packed two-level map (vqvae2.TwoLevelGenerator): each level's codes are shuffled
    among its own columns, and a baseline is taken per level and averaged over all codes;
    with one level both are the plain whole-map versions."""
    rng = np.random.default_rng(0)
    top, bottom = rng.integers(0, 4, (6, 4)), rng.integers(4, 8, (6, 12))
    packed = np.concatenate([top, bottom], axis=1)
    levels = (slice(0, 4), slice(4, 16))
    shuffled = metrics.shuffle_codes(packed, np.random.default_rng(1), levels)
    assert (shuffled[:, :4] < 4).all() and (shuffled[:, 4:] >= 4).all()
    np.testing.assert_array_equal(np.sort(shuffled[:, 4:]), np.sort(bottom))
    assert not np.array_equal(shuffled, packed)
    maps = packed.reshape(6, 4, 4)
    one = metrics.shuffle_codes(maps, np.random.default_rng(2), (slice(None),))
    again = np.random.default_rng(2)
    np.testing.assert_array_equal(one, [again.permutation(m.ravel()).reshape(4, 4)
                                        for m in maps])
    train, test = packed[:4], packed[4:]
    per_level = [metrics.unigram_bits(train[:, level], test[:, level], 8) for level in levels]
    assert np.isclose(metrics.by_level(metrics.unigram_bits, train, test, 8, levels),
                      (4 * per_level[0] + 12 * per_level[1]) / 16)
    assert np.isclose(metrics.by_level(metrics.unigram_bits, train, test, 8, (slice(None),)),
                      metrics.unigram_bits(train, test, 8))
