"""How good are generated slices? Each number comes with a baseline that gives it a scale.

    likelihood    bits per code of held-out code maps under the prior, against a uniform guess
                  (log2 K), the training code frequencies (unigram) and the training code
                  frequencies at each grid position (per-position unigram)
    diversity     mean pairwise MS-SSIM within a set of images: 1 = all identical
    memorisation  SSIM of each image to its nearest training slice: ~1 = a copy
    realism       Fréchet distance between feature statistics of two sets of images, and its
                  mean term (how far apart the average features are); the same on slices
                  standardised to one brightness and contrast; the mean brightness inside the
                  brain, and the share of its pixels in each band of brightness (histogram);
                  dark islands: dark spots enclosed by the brain, which mottled white matter
                  has more of than real slices

sample_report gathers them all for a set of samples (predict.py --generate), print_report
prints them. Images are float32 (N, H, W, 1) in [0, 1]; code maps are int32 (N, h, w).
"""

import math

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
SSIM_WINDOW = 11


def unigram_bits(train_codes, test_codes, codebook_size):
    """Bits per code of `test_codes` when each code is drawn independently with its training
    frequency (add-one smoothed, so a code never seen in training costs log2(N + K) bits)."""
    counts = np.bincount(np.ravel(train_codes), minlength=codebook_size) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[np.ravel(test_codes)]))


def position_unigram_bits(train_codes, test_codes, codebook_size,
                          strengths=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)):
    """Bits per code of `test_codes` (N, h, w) when the code at each grid position is drawn
    independently with its training frequency *at that position*. A prior that only learned
    where things are in an aligned slice (its position embedding can) matches this baseline;
    beating it shows that the prior uses the neighbouring codes.

    Unseen (position, code) pairs get mass by Dirichlet smoothing towards the global unigram u:
        p(k | pos) = (n_pos,k + a u_k) / (n + a)       n: training maps
    with the strength a chosen among `strengths` by leave-one-out likelihood on the training
    maps alone (each training code scored with itself removed from the counts).
    """
    train, test = np.asarray(train_codes), np.asarray(test_codes)
    n, K, positions = len(train), codebook_size, train[0].size
    unigram = np.bincount(train.ravel(), minlength=K) + 1.0
    unigram /= unigram.sum()

    def cells(codes):  # (N, h, w) -> (N, h*w) index of each (position, code) pair
        return np.arange(positions) * K + codes.reshape(len(codes), -1)

    counts = np.bincount(cells(train).ravel(), minlength=positions * K)  # n_pos,k

    def bits(codes, strength, left_out=0):
        seen = counts[cells(codes)] - left_out
        return -np.mean(np.log2((seen + strength * unigram[codes.reshape(len(codes), -1)])
                                / (n - left_out + strength)))

    strength = min(strengths, key=lambda a: bits(train, a, left_out=1))
    return float(bits(test, strength))


def shuffle_codes(codes, rng, levels):
    """Each code map's codes in random places (the right code frequencies, no structure), a
    packed map's (vqvae2.TwoLevelGenerator) each level among its own `levels` columns."""
    flat = codes.reshape(len(codes), -1).copy()
    for row in flat:
        for level in levels:
            row[level] = rng.permutation(row[level])
    return flat.reshape(codes.shape)


def by_level(baseline, train_codes, test_codes, codebook_size, levels):
    """A baseline's bits per code, taken level by level (each level has its own codebook) and
    averaged over all codes."""
    train, test = (codes.reshape(len(codes), -1) for codes in (train_codes, test_codes))
    return float(np.average([baseline(train[:, level], test[:, level], codebook_size)
                             for level in levels],
                            weights=[test[:, level].shape[1] for level in levels]))


def prior_bits(prior, codes, batch_size=32, measure=None):
    """Mean bits per code of the code maps (N, h, w) under the prior, in batches; or the mean
    of `measure(batch)` (e.g. a two-level generator's level_bits, one number per level)."""
    measure = measure or prior.bits_per_code
    total = sum(np.asarray(measure(codes[i:i + batch_size]), np.float64)
                * len(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size))
    return total / len(codes)


def ms_ssim(a, b):
    """Per-pair MS-SSIM (N,) with as many of the 5 standard scales as the image size allows
    (each scale halves the image; the 11-pixel window must still fit), their weights rescaled
    to sum to 1 so that fewer scales do not inflate the score."""
    size = min(a.shape[1], a.shape[2])
    if size < SSIM_WINDOW:
        raise ValueError(f"MS-SSIM needs images of at least {SSIM_WINDOW} pixels, got {size}")
    scales = min(5, int(math.log2(size / SSIM_WINDOW)) + 1)
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    return tf.image.ssim_multiscale(a, b, 1.0, power_factors=weights.tolist(),
                                    filter_size=SSIM_WINDOW).numpy()


def mean_pairwise_ms_ssim(images, max_images=64, batch_size=128, seed=0):
    """Mean MS-SSIM over every pair among `max_images` images (64 -> 2,016 pairs) drawn at
    random (fixed seed) from the whole set: a set sorted by file name puts similar slices
    together, so its first images would be a skewed subset."""
    if len(images) > max_images:
        picks = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = images[np.sort(picks)]
    images = tf.constant(images)
    first, second = np.triu_indices(len(images), k=1)
    scores = [ms_ssim(tf.gather(images, first[i:i + batch_size]),
                      tf.gather(images, second[i:i + batch_size]))
              for i in range(0, len(first), batch_size)]
    return float(np.mean(np.concatenate(scores)))


def thumbnails(images, size=64, batch_size=256):
    """(N, H, W, 1) -> (N, size * size) by area averaging, for a fast nearest-neighbour search
    (in batches, so a large training split is never copied whole)."""
    return tf.concat([tf.reshape(tf.image.resize(images[i:i + batch_size], (size, size),
                                                 method="area"), (-1, size * size))
                      for i in range(0, len(images), batch_size)], axis=0)


def nearest_training_ssim(images, train_images, candidates=20):
    """For each image, its highest SSIM to any training slice, and that slice's index: (N,), (N,).

    SSIM against all training slices would take minutes on a CPU, so each image is compared
    with the `candidates` training slices closest in mean squared distance at 64 x 64, where a
    near copy is the closest of all (the tests check that a copy is found).
    """
    query, keys = thumbnails(images), thumbnails(train_images)
    distances = (tf.reduce_sum(query**2, 1)[:, None] - 2 * tf.matmul(query, keys, transpose_b=True)
                 + tf.reduce_sum(keys**2, 1)[None])
    shortlist = tf.math.top_k(-distances, k=min(candidates, len(train_images))).indices.numpy()
    best, index = np.zeros(len(images)), np.zeros(len(images), int)
    for n, rows in enumerate(shortlist):
        image = np.repeat(images[n:n + 1], len(rows), axis=0)
        ssim = tf.image.ssim(image, train_images[rows], 1.0, filter_size=SSIM_WINDOW).numpy()
        best[n], index[n] = ssim.max(), rows[ssim.argmax()]
    return best, index


SECOND_FEATURE_SEED = 1000  # sample_report's second, unrelated feature network


def feature_network(seed=0):
    """A fixed, randomly initialised CNN: (N, H, W, 1) -> (N, 192) features.

    Four stride-2 3x3 ReLU convolutions (16, 32, 64, 128 channels, He-normal weights from
    `seed`); the features are the spatial means of the last two maps. Why random weights: they
    need no download, are the same wherever the pinned versions run, and owe nothing to the
    VQ-VAE being judged (its own encoder would score its decoder's outputs in its own terms).
    Trained ImageNet features are not available offline, and were not trained on MRI either.
    """
    inputs = keras.Input((None, None, 1))
    x, maps = inputs, []
    for i, channels in enumerate((16, 32, 64, 128)):
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu",
                                kernel_initializer=keras.initializers.HeNormal(seed + i),
                                dtype="float32")(x)
        maps.append(x)
    pooled = [keras.layers.GlobalAveragePooling2D(dtype="float32")(m) for m in maps[-2:]]
    return keras.Model(inputs, keras.layers.Concatenate(dtype="float32")(pooled))


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), between the Gaussians
    fitted to two feature sets (N, F)."""
    return sum(frechet_terms(features_a, features_b))


def frechet_terms(features_a, features_b):
    """The Fréchet distance's two terms: (||mu_a - mu_b||^2, the trace term). The first says
    how far apart the average features are; in our pooled random features it moves most with
    overall brightness. Symmetric square roots by eigendecomposition."""
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.sum((mean_a - mean_b) ** 2)), float(trace)


BRAIN_THRESHOLD = 0.05  # pixels above it are brain; the skull-stripped slices' background is 0


def standardised_brains(images):
    """A copy of images (N, H, W, 1) with each one's brain pixels (above BRAIN_THRESHOLD)
    moved and scaled to mean 0.5 and standard deviation 0.25, then clipped to [0, 1], and the
    rest left as it is: each slice's overall brightness and contrast taken out, so that
    features of the result see anatomy and texture. Pixels more than 2 standard deviations
    below their slice's mean (the darkest CSF) clip to 0, like the background, so the extent
    of very dark regions still counts."""
    out = np.array(images, np.float32, copy=True)
    for image in out:
        brain = image > BRAIN_THRESHOLD
        if brain.sum() > 1:
            values = image[brain]
            scaled = 0.5 + 0.25 * (values - values.mean()) / max(float(values.std()), 1e-6)
            image[brain] = np.clip(scaled, 0, 1)
    return out


def brain_styles(images):
    """images (N, H, W, 1) in [0, 1] -> (N, 2) float: the mean and standard deviation of each
    slice's brain pixels (above BRAIN_THRESHOLD; 0, 0 for a slice without any), its
    brightness and contrast."""
    styles = np.zeros((len(images), 2), np.float32)
    for row, image in zip(styles, np.asarray(images)):
        brain = image[image > BRAIN_THRESHOLD]
        if brain.size:
            row[:] = brain.mean(), brain.std()
    return styles


def brain_intensity(images):
    """Mean intensity inside the brain (pixels above BRAIN_THRESHOLD), averaged over images
    (N, H, W, 1) that have any (0.0 if none has): a slice with less dark CSF, or brighter
    tissue, scores higher."""
    has_brain = (np.asarray(images) > BRAIN_THRESHOLD).any(axis=(1, 2, 3))
    means = brain_styles(images)[has_brain, 0]
    return float(means.mean()) if len(means) else 0.0


INTENSITY_BINS = (BRAIN_THRESHOLD, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)  # the first: dark CSF


def brain_histogram(images, bins=INTENSITY_BINS):
    """images (N, H, W, 1) in [0, 1] -> a list of len(bins) - 1 floats: the fractions of the
    brain's pixels (above BRAIN_THRESHOLD) in each intensity bin [bins[i], bins[i + 1]), the
    last one open above, averaged over the images that have any brain (zeros if none has).
    Says where brain_intensity's difference comes from: e.g. too little dark CSF (the first
    bin), or too much of the brightest white matter (the last)."""
    edges = np.array(bins, np.float64)
    edges[-1] = np.inf  # every brain pixel falls in a bin
    brains = [image[image > BRAIN_THRESHOLD] for image in images]
    rows = [np.histogram(brain, edges)[0] / brain.size for brain in brains if brain.size]
    return np.mean(rows, axis=0).tolist() if rows else [0.0] * (len(bins) - 1)


DARK = 0.45  # below it a pixel is dark: CSF and the darkest grey matter
ISLAND_PIXELS = 4  # a smaller dark spot is too small to see at a glance


def dark_islands(images, threshold=DARK, min_pixels=ISLAND_PIXELS):
    """Dark spots enclosed by the brain, per 10,000 pixels of brain, averaged over images
    (N, H, W, 1) that have any brain: the connected regions (4-neighbours) of pixels below
    `threshold`, of at least `min_pixels`, that touch nothing outside the brain's outline (its
    pixels above BRAIN_THRESHOLD, holes filled) nor the image's edge. A real slice's sulci
    open onto the dark around the brain, so its islands are the ventricles and sulci cut
    across; white matter mottled with dark dots, as the eye sees in samples, has many more."""
    rates = []
    for image in np.asarray(images)[..., 0]:
        brain = ndimage.binary_fill_holes(image > BRAIN_THRESHOLD)
        if not brain.any():
            continue
        labels, count = ndimage.label(image < threshold)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        enclosed = np.ones(count + 1, bool)
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        enclosed[np.unique(np.concatenate([labels[~brain], edge]))] = False  # opens outwards
        enclosed[0] = False  # not dark
        rates.append(np.sum(enclosed & (sizes >= min_pixels)) / brain.sum() * 10_000)
    return float(np.mean(rates)) if rates else 0.0


def sample_report(prior, vqvae, samples, real, test, other_picks, train, seed=0,
                  batch_size=32):
    """Every measure above, each next to its baselines, as a dict: `samples` against `real`
    slices (as many), with the test slices at `other_picks` (others than the real ones) as the
    floor (themselves, and their reconstructions) and decoded shuffled codes as the ceiling;
    likelihood on the codes of all `test` slices, memorisation against `train`. `vqvae` encodes
    and decodes images (a vqvae2.TwoLevelGenerator packs both levels' maps into one)."""
    K, n, other = vqvae.codebook_size, len(samples), test[other_picks]
    test_codes = vqvae.encode_all(np.array_split(test, max(1, len(test) // batch_size)))
    train_codes = vqvae.encode_all(np.array_split(train, max(1, len(train) // batch_size)))
    other_codes = test_codes[other_picks]
    levels = getattr(vqvae, "levels", (slice(None),))  # vqvae2.py packs 2 maps per slice
    shuffled = shuffle_codes(other_codes, np.random.default_rng(seed), levels)
    reconstructions = vqvae.decode_all(other_codes)
    compared = {"samples": samples, "real_test_other_half": other,
                "test_reconstructions": reconstructions,
                "shuffled_codes": vqvae.decode_all(shuffled)}
    nearest = {name: summarise(nearest_training_ssim(images, train)[0]) for name, images
               in (("samples", samples), ("real_test", real),
                   ("test_reconstructions", reconstructions))}
    baseline = lambda bits: by_level(bits, train_codes, test_codes, K, levels)  # noqa
    if hasattr(prior, "level_bits"):  # two levels: each prior scored once, on its own level
        level_nll = prior_bits(prior, test_codes, measure=prior.level_bits)
        prior_nll = float(prior.over_levels(*level_nll))
        per_level = two_level_bits(prior, level_nll)
    else:
        prior_nll, per_level = float(prior_bits(prior, test_codes)), {}
    result = {
        "images_compared": n,
        "bits_per_test_code": {"prior": prior_nll,
                               "unigram": baseline(unigram_bits),
                               "position_unigram": baseline(position_unigram_bits),
                               "uniform": float(np.log2(K))},
        # the reconstructions too, next to the real slices they come from: a blurring decoder
        # makes any two slices more alike, and so would a perfect prior's samples through it
        "mean_pairwise_ms_ssim": {name: mean_pairwise_ms_ssim(images) for name, images
                                  in (("samples", samples), ("real_test", real),
                                      ("real_test_other_half", other),
                                      ("test_reconstructions", reconstructions))},
        "nearest_training_ssim": nearest,
        "brain_intensity": {"real_test": brain_intensity(real)} | {
            name: brain_intensity(images) for name, images in compared.items()},
        "brain_histogram": {"bins": list(INTENSITY_BINS),
                            "real_test": brain_histogram(real)} | {
            name: brain_histogram(images) for name, images in compared.items()},
        "dark_islands": {"real_test": dark_islands(real)} | {
            name: dark_islands(images) for name, images in compared.items()},
    }
    # the same rows in the features of two unrelated random CNNs, so that no choice is tuned
    # to the quirks of one network; and on standardised slices, since both networks' pooled
    # features move most with overall brightness
    for suffix, network_seed, prepare, _ in FRECHET_ROWS:
        result["frechet_distance" + suffix], result["frechet_mean_term" + suffix] = (
            frechet_rows(prepare(real), {name: prepare(images) for name, images
                                         in compared.items()}, network_seed))
    return result | per_level


FRECHET_ROWS = (  # (report key suffix, feature network seed, images prepared by, label)
    ("", 0, np.asarray, "random-CNN features"),
    ("_second_cnn", SECOND_FEATURE_SEED, np.asarray, "a second random CNN"),
    ("_standardised", 0, standardised_brains,
     "slices standardised to one brightness and contrast"))


def frechet_rows(real, compared, seed):
    """({name: Fréchet distance from `real` to compared[name]}, {name: its mean term}) in the
    features of feature_network(seed)."""
    network = feature_network(seed)
    features = lambda images: network.predict(images, batch_size=32, verbose=0)  # noqa: E731
    real_features = features(real)
    terms = {name: frechet_terms(real_features, features(images))
             for name, images in compared.items()}
    return ({name: sum(pair) for name, pair in terms.items()},
            {name: pair[0] for name, pair in terms.items()})


def print_report(result):
    """sample_report's numbers, a line per measure."""
    bits, div = result["bits_per_test_code"], result["mean_pairwise_ms_ssim"]
    near = result["nearest_training_ssim"]
    print(f"metrics over {result['images_compared']} samples and as many real test slices:")
    print(f"  likelihood: prior NLL on the test codes {bits['prior']:.3f} bits/code "
          f"(per-position unigram {bits['position_unigram']:.3f}, unigram "
          f"{bits['unigram']:.3f}, uniform {bits['uniform']:.3f})")
    if "bits_per_test_slice" in result:
        top, bottom = result["bits_per_test_code_by_level"].values()
        print(f"    by level: top {top:.3f}, bottom {bottom:.3f} bits/code; "
              f"{result['bits_per_test_slice']:.0f} bits per slice")
    print(f"  diversity, mean pairwise MS-SSIM (lower = more varied): samples "
          f"{div['samples']:.3f}, real test slices {div['real_test']:.3f}; reference: test "
          f"reconstructions {div['test_reconstructions']:.3f} (their real slices "
          f"{div['real_test_other_half']:.3f})")
    print("  memorisation, SSIM to the nearest training slice (mean / max): " + ", ".join(
        f"{name.replace('_', ' ')} {near[name]['mean']:.3f} / {near[name]['max']:.3f}"
        for name in ("samples", "real_test", "test_reconstructions")))
    for suffix, _, _, network in FRECHET_ROWS:
        fd, means = result["frechet_distance" + suffix], result["frechet_mean_term" + suffix]
        print(f"  realism, Frechet distance to real test slices ({network}): samples "
              f"{fd['samples']:.4g} (mean term {means['samples']:.4g}); floor: other real test "
              f"slices {fd['real_test_other_half']:.4g}, test reconstructions "
              f"{fd['test_reconstructions']:.4g}; shuffled codes {fd['shuffled_codes']:.4g}")
    print("  brightness, mean intensity inside the brain: " + ", ".join(
        f"{name.replace('_', ' ')} {value:.3f}"
        for name, value in result["brain_intensity"].items()))
    print("  dark islands inside the brain, per 10,000 of its pixels (mottled white matter): "
          + ", ".join(f"{name.replace('_', ' ')} {value:.2f}"
                      for name, value in result["dark_islands"].items()))
    bins = result["brain_histogram"]["bins"]
    print(f"  of the brain's pixels, darker than {bins[1]} (CSF) / at least {bins[-2]}: "
          + ", ".join(f"{name.replace('_', ' ')} {h[0]:.3f} / {h[-1]:.3f}"
                      for name, h in result["brain_histogram"].items() if name != "bins"))


def two_level_bits(generator, levels):
    """A two-level generator's bits per (top, bottom) test code -> the report's entries: by
    level, and per slice (to set beside a one-level prior's bits per code x its codes)."""
    return {"bits_per_test_code_by_level": dict(zip(("top", "bottom"), map(float, levels))),
            "bits_per_test_slice": float(levels[0] * np.prod(generator.top_shape)
                                         + levels[1] * np.prod(generator.bottom_shape))}


def summarise(values):
    """Mean, median, 5th percentile, min and max of `values`, as floats."""
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "p5": float(np.percentile(values, 5)), "min": float(np.min(values)),
            "max": float(np.max(values))}
