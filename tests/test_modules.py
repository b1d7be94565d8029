import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage.metrics import structural_similarity

import modules
from conftest import BRAIN_SLICES, fake_slice


def make_quantizer(K=6, D=3, **kwargs):
    quantizer = modules.VectorQuantizer(codebook_size=K, code_dim=D, seed=0, **kwargs)
    quantizer.build((None, 2, 2, D))
    return quantizer


def test_nearest_code_matches_brute_force_search():
    quantizer = make_quantizer(K=32, D=5)
    rng = np.random.default_rng(0)
    quantizer.codebook.assign(rng.normal(size=(32, 5)).astype("float32"))
    z = rng.normal(size=(3, 4, 7, 5)).astype("float32")
    codes = np.asarray(quantizer.nearest_codes(z))
    distances = ((z[..., None, :] - quantizer.codebook.numpy()) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, distances.argmin(-1))
    assert codes.shape == (3, 4, 7)


def test_quantized_output_is_the_chosen_code_and_gradient_passes_straight_through():
    quantizer = make_quantizer()
    z = tf.Variable(np.random.default_rng(1).normal(size=(2, 3, 3, 3)).astype("float32"))
    weights = tf.constant(np.random.default_rng(2).normal(size=(2, 3, 3, 3)), tf.float32)
    with tf.GradientTape() as tape:
        z_q, codes, _ = quantizer(z, training=False)
        objective = tf.reduce_sum(weights * z_q)
    np.testing.assert_allclose(z_q, quantizer.codebook.numpy()[codes.numpy()], atol=1e-6)
    # d(sum w * z_q)/dz = w exactly: the quantizer is the identity for gradients
    np.testing.assert_allclose(tape.gradient(objective, z), weights, atol=1e-6)


def test_commitment_loss_is_beta_times_mean_squared_distance():
    quantizer = make_quantizer(beta=0.25)
    z = np.random.default_rng(3).normal(size=(1, 2, 2, 3)).astype("float32")
    z_q, _, vq_loss = quantizer(z)
    np.testing.assert_allclose(vq_loss, 0.25 * np.mean((z - z_q.numpy()) ** 2), rtol=1e-5)


def test_ema_moves_codes_toward_the_mean_of_their_assigned_vectors():
    quantizer = make_quantizer(K=2, D=2, ema_decay=0.9)
    quantizer.codebook.assign([[0.0, 0.0], [10.0, 10.0]])
    quantizer.ema_sum.assign([[0.0, 0.0], [10.0, 10.0]])
    quantizer.steps_unused.assign([0.0, 0.0])
    # all four vectors are nearest to code 0; their sum is (4, 8), their mean (1, 2)
    z = np.array([[[[0.5, 1.5], [1.5, 2.5]], [[1.0, 2.0], [1.0, 2.0]]]], "float32")
    quantizer(z, training=True)
    # one step by hand: count <- 0.9 * 1 + 0.1 * n, sum <- 0.9 * sum + 0.1 * sum of vectors
    np.testing.assert_allclose(quantizer.ema_count.numpy(), [1.3, 0.9], rtol=1e-6)
    np.testing.assert_allclose(quantizer.ema_sum.numpy(), [[0.4, 0.8], [9.0, 9.0]], rtol=1e-6)
    # Laplace smoothing (epsilon 1e-5) barely changes well-populated counts
    np.testing.assert_allclose(quantizer.codebook.numpy()[0], np.array([0.4, 0.8]) / 1.3,
                               rtol=1e-4)
    np.testing.assert_allclose(quantizer.codebook.numpy()[1], [10.0, 10.0], rtol=1e-4)
    for _ in range(50):
        quantizer(z, training=True)
    np.testing.assert_allclose(quantizer.codebook.numpy()[0], [1.0, 2.0], atol=0.01)


def test_gradient_codebook_mode_learns_codes_by_the_codebook_loss():
    quantizer = make_quantizer(use_ema=False)
    assert [w.name for w in quantizer.trainable_weights] == ["codebook"]
    z = np.random.default_rng(4).normal(size=(1, 2, 2, 3)).astype("float32")
    codebook, codes = quantizer.codebook.numpy(), quantizer.nearest_codes(z).numpy().ravel()
    with tf.GradientTape() as tape:
        _, _, vq_loss = quantizer(z, training=True)  # restarts touch only unchosen codes
    gradient = tf.convert_to_tensor(tape.gradient(vq_loss, quantizer.codebook)).numpy()
    # d/de_k mean over N*D entries of (z - e_k)^2 = sum over the z assigned to k of 2(e_k - z)/(N D)
    flat = z.reshape(-1, 3)
    expected = np.zeros_like(codebook)
    for vector, code in zip(flat, codes):
        expected[code] += 2 * (codebook[code] - vector) / flat.size
    np.testing.assert_allclose(gradient, expected, atol=1e-6)
    assert np.abs(expected).sum() > 0


@pytest.mark.parametrize("use_ema", [True, False])
def test_dead_codes_are_reseeded_from_encoder_outputs(use_ema):
    quantizer = make_quantizer(K=4, D=2, dead_code_steps=3, use_ema=use_ema)
    quantizer.codebook.assign([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    quantizer.ema_sum.assign(quantizer.codebook)
    quantizer.steps_unused.assign([0.0, 0.0, 0.0, 0.0])
    z = np.array([[[[0.1, 0.2], [0.3, 0.1]], [[0.2, 0.2], [0.0, 0.3]]]], "float32")
    for step in range(2):  # codes 1..3 unused for 2 steps: still alive
        quantizer(z, training=True)
    np.testing.assert_allclose(quantizer.codebook.numpy()[1:], [[50, 50], [60, 60], [70, 70]],
                               rtol=1e-4)
    quantizer(z, training=True)  # third unused step: restarted
    vectors = z.reshape(-1, 2)
    for code in quantizer.codebook.numpy()[1:]:
        assert np.min(np.abs(vectors - code).sum(axis=1)) < 1e-6  # equals one encoder output
    np.testing.assert_array_equal(quantizer.steps_unused.numpy(), [0, 0, 0, 0])
    for _ in range(3):  # the EMA state was reset too: restarted codes stay among the data
        quantizer(z, training=True)
    assert np.abs(quantizer.codebook.numpy()).max() < 0.5


def test_dead_codes_restart_from_poorly_quantised_vectors_not_the_background():
    """90 of 100 vectors sit exactly on code 0 (the black background), 10 are far from every
    code: restarts drawn in proportion to quantisation error take only those 10 (a uniform
    draw would take a background vector for ~90% of the codes)."""
    quantizer = make_quantizer(K=8, D=2)
    quantizer.codebook.assign(np.concatenate([np.zeros((1, 2)), np.full((7, 2), 100.0)]))
    quantizer.ema_sum.assign(quantizer.codebook)
    quantizer.steps_unused.assign([0.0] + [float(quantizer.dead_code_steps)] * 7)
    foreground = np.random.default_rng(11).uniform(3, 6, size=(10, 2))
    z = np.concatenate([np.zeros((90, 2)), foreground]).astype("float32").reshape(1, 10, 10, 2)
    quantizer(z, training=True)
    for code in quantizer.codebook.numpy()[1:]:
        assert np.abs(foreground - code).sum(axis=1).min() < 1e-5, code


def test_first_training_step_seeds_unused_codes_from_data():
    quantizer = make_quantizer(K=8, D=2)
    z = np.random.default_rng(5).normal(5.0, 0.1, size=(1, 4, 4, 2)).astype("float32")
    _, codes, _ = quantizer(z, training=True)
    unchosen = np.setdiff1d(np.arange(8), codes.numpy())
    assert len(unchosen) >= 6
    assert np.all(np.abs(quantizer.codebook.numpy()[unchosen] - 5.0) < 1.0)  # now near the data


def test_code_statistics_perplexity_and_usage():
    codes = np.array([[0, 1], [2, 3]])  # 4 of 8 codes, uniform: perplexity 4
    perplexity, usage = modules.code_statistics(codes, 8)
    np.testing.assert_allclose(perplexity, 4.0, rtol=1e-5)
    np.testing.assert_allclose(usage, 0.5)


@pytest.mark.parametrize("downsample, grid", [(4, 8), (8, 4)])
def test_vqvae_public_api_shapes_and_ranges(downsample, grid):
    model = modules.VQVAE(image_size=32, downsample=downsample, width=8, code_dim=4,
                          codebook_size=16, seed=0)
    images = np.random.default_rng(6).random((2, 32, 32, 1)).astype("float32")
    reconstructions = model(images)
    assert reconstructions.shape == images.shape
    assert 0.0 <= float(np.min(reconstructions)) and float(np.max(reconstructions)) <= 1.0
    codes = model.encode(images)
    assert codes.shape == (2, grid, grid) and codes.dtype == "int32"
    assert 0 <= int(np.min(codes)) and int(np.max(codes)) < 16
    assert model.decode_codes(codes).shape == images.shape


def tiny_vqvae(**kwargs):
    return modules.VQVAE(image_size=16, width=8, code_dim=4, codebook_size=8, seed=0, **kwargs)


def test_an_exact_reconstruction_scores_the_psnr_cap_not_infinity():
    """A blank slice reconstructed exactly (the clipped output is 0 everywhere) has zero error:
    PSNR is capped at 100 dB so that the logs stay finite and a NaN means a real failure."""
    model = tiny_vqvae()
    head = model.decoder.to_pixel_blocks
    head.kernel.assign(np.zeros(head.kernel.shape))
    head.bias.assign(np.full(head.bias.shape, -1.0))  # clipped to exactly 0
    model.compile(jit_compile=False)
    black = np.zeros((4, 16, 16, 1), "float32")
    results = model.evaluate(black, batch_size=4, verbose=0, return_dict=True)
    assert results["psnr"] == modules.PSNR_CAP_DB and results["ssim"] == pytest.approx(1.0)
    ssim, psnr = modules.image_quality(black + 0.5, black + 0.49)
    np.testing.assert_allclose(psnr, 40.0, rtol=1e-4)  # below the cap, PSNR is untouched


@pytest.mark.parametrize("subpixel", [True, False])
def test_codes_come_from_float32_vectors_under_mixed_bfloat16(subpixel):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_vqvae(subpixel=subpixel)
    images = np.random.default_rng(12).random((2, 16, 16, 1)).astype("float32")
    assert model.encoder(images).dtype == "float32"  # not rounded to bfloat16's 8 bits
    output = model.decoder.to_pixel_blocks if subpixel else model.decoder.to_image
    assert output.compute_dtype == "float32" and model(images).dtype == "float32"


def test_straight_through_gives_the_encoder_exactly_the_decoders_input_gradient():
    model = tiny_vqvae()
    images = np.random.default_rng(13).random((2, 16, 16, 1)).astype("float32")
    with tf.GradientTape(persistent=True) as tape:
        z_e = model.encoder(images)
        z_q, _, _ = model.quantizer(z_e)
        loss = tf.reduce_mean((images - model.decoder(z_q)) ** 2)
    to_encoder, to_decoder = tape.gradient(loss, z_e).numpy(), tape.gradient(loss, z_q).numpy()
    np.testing.assert_allclose(to_encoder, to_decoder, atol=1e-9)
    assert np.abs(to_decoder).max() > 0


def test_vqvae_saves_and_loads_as_keras_file_with_codebook_state(tmp_path):
    model = modules.VQVAE(image_size=16, width=8, code_dim=4, codebook_size=8, seed=0)
    model.quantizer.codebook.assign(np.random.default_rng(7).normal(size=(8, 4)))
    model.quantizer.steps_unused.assign(np.arange(8, dtype="float32"))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    images = np.random.default_rng(8).random((2, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)
    np.testing.assert_array_equal(loaded.quantizer.steps_unused.numpy(), np.arange(8))
    assert loaded.get_config()["codebook_size"] == 8


def test_the_transposed_output_stage_keeps_the_shapes_and_saves_and_loads(tmp_path):
    """subpixel=False (study.py's comparison) is the decoder before the sub-pixel stage: a
    transposed convolution per doubling, the last to full size on the finest stage's channels,
    then a 1-channel 3x3 convolution."""
    model = modules.VQVAE(image_size=16, width=16, code_dim=4, codebook_size=8, seed=0,
                          subpixel=False)  # stages [8, 16]
    layers_ = [(type(step).__name__, step.filters) for step in model.decoder.steps]
    assert layers_ == [("Conv2D", 16), ("ResidualBlock", 16), ("Conv2DTranspose", 16),
                       ("Conv2DTranspose", 8)]
    assert model.decoder.to_image.kernel.shape == (3, 3, 8, 1)
    assert not hasattr(model.decoder, "to_pixel_blocks")
    images = np.random.default_rng(9).random((2, 16, 16, 1)).astype("float32")
    assert model(images).shape == images.shape
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.decoder.subpixel is False
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)


def test_a_decoder_saved_before_the_choice_existed_loads_as_subpixel():
    config = modules.Decoder(4, 8, 1).get_config()
    del config["subpixel"]  # as in .keras files saved before the flag
    decoder = modules.Decoder.from_config(config)
    assert decoder.subpixel is True
    assert decoder(np.zeros((1, 2, 2, 4), "float32")).shape == (1, 8, 8, 1)


@pytest.mark.parametrize("use_ema, precision", [(True, "float32"), (False, "float32"),
                                                 (True, "mixed_bfloat16"),
                                                 (True, "mixed_float16")])
def test_training_teaches_encoder_codebook_and_decoder(use_ema, precision):
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    model = modules.VQVAE(image_size=16, width=8, code_dim=4, codebook_size=8, seed=0,
                          data_variance=0.1, use_ema=use_ema)
    assert model.quantizer.compute_dtype == "float32"  # under mixed precision too
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    rng = np.random.default_rng(9)
    images = np.stack([fake_slice(rng, 16) for _ in range(16)])[..., None].astype("float32") / 255
    encoder, codebook = model.encoder.get_weights(), model.quantizer.codebook.numpy()
    history = model.fit(images, batch_size=8, epochs=45, shuffle=False, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    # the encoder and the codebook learned, not only the output bias: the reconstructions beat
    # the best constant image (the per-pixel mean), whose squared error is the pixel variance
    for before, after in zip(encoder, model.encoder.get_weights()):
        assert np.abs(after - before).max() > 1e-3
    assert np.abs(model.quantizer.codebook.numpy() - codebook).max() > 1e-3
    error = np.mean((images - model.predict(images, verbose=0)) ** 2)
    assert error < np.mean(images.var(axis=0))


def ssim_pairs():
    rng = np.random.default_rng(10)
    smooth = tf.image.resize(rng.random((1, 12, 12, 1)), (48, 48)).numpy()[0].astype("float32")
    noisy = [np.clip(smooth + rng.normal(0, s, smooth.shape), 0, 1).astype("float32") for s in (0.02, 0.1)]
    pairs = [(smooth, b) for b in noisy]
    pairs.append((smooth, rng.random(smooth.shape).astype("float32")))
    if BRAIN_SLICES.is_dir():
        from PIL import Image
        files = sorted((BRAIN_SLICES / "validate").glob("*.png"))[:2]
        a, b = (np.asarray(Image.open(f), "float32")[..., None] / 255 for f in files)
        pairs.append((a, b))
    return pairs


def test_ssim_matches_scikit_image_gaussian_sigma_1_5():
    for a, b in ssim_pairs():
        ours = float(modules.image_quality(a[None], b[None])[0][0])
        reference = structural_similarity(a[..., 0], b[..., 0], data_range=1.0,
                                          gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
        assert abs(ours - reference) < 1e-3, (ours, reference)
