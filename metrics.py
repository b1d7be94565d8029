"""How good are generated slices? Each number comes with a baseline that gives it a scale.

    likelihood    bits per code of held-out code maps under the prior, against a uniform guess
                  (log2 K), the training code frequencies (unigram) and the training code
                  frequencies at each grid position (per-position unigram)
    diversity     mean pairwise MS-SSIM within a set of images: 1 = all identical
    memorisation  SSIM of each image to its nearest training slice: ~1 = a copy
    realism       Fréchet distance between feature statistics of two sets of images, and its
                  mean term (how far apart the average features are); the same on slices
                  standardised to one brightness and contrast; the mean brightness inside the
                  brain, and the share of its pixels in each band of brightness (histogram)

Images are float32 (N, H, W, 1) in [0, 1]; code maps are int32 (N, h, w).
"""

import math

import keras
import numpy as np
import tensorflow as tf

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


def prior_bits(prior, codes, batch_size=32):
    """Mean bits per code of the code maps (N, h, w) under the prior."""
    total = sum(float(prior.bits_per_code(codes[i:i + batch_size])) * len(codes[i:i + batch_size])
                for i in range(0, len(codes), batch_size))
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


SECOND_FEATURE_SEED = 1000  # predict.py's second, unrelated feature network


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
