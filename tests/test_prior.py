"""prior.py: causal masks, the cached sampler, learning, sampling, saving and loading
(also of a .keras file saved while the prior still lived in modules.py)."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from prior import MaskedConv2D, PixelCNNPrior

FIXTURES = Path(__file__).parent / "fixtures"


def make_prior(grid=6, K=10, layers=6, kernel=3, dropout=0.0):
    keras.utils.set_random_seed(0)
    return PixelCNNPrior(grid_size=grid, codebook_size=K, width=8, layers=layers,
                         kernel_size=kernel, position_dim=4, dropout=dropout)


@pytest.mark.parametrize("kernel", [3, 5])
def test_prior_logits_depend_on_exactly_the_earlier_codes(kernel):
    """Causality checked numerically at every position: changing one code changes the logits at
    (r, c) if and only if it comes before (r, c) in raster order. With 6 layers every earlier code of a 6x6
    map is in reach, so "if" also shows that there is no blind spot."""
    prior = make_prior(kernel=kernel)
    codes = np.random.default_rng(1).integers(0, 10, (1, 6, 6)).astype("int32")
    base = prior(codes).numpy()[0]
    order = np.arange(36).reshape(6, 6)  # raster position of every (r, c)
    for i in range(6):
        for j in range(6):  # change code (i, j), look at the logits of all 36 positions
            changed = codes.copy()
            changed[0, i, j] = (changed[0, i, j] + 1) % 10
            effect = np.abs(prior(changed).numpy()[0] - base).max(axis=-1)
            later = order > order[i, j]
            assert np.all(effect[later] > 1e-6), f"some later logits ignore code {(i, j)}"
            assert np.all(effect[~later] == 0), f"some logits see the later code {(i, j)}"


@pytest.mark.parametrize("layers, kernel, reach", [(6, 3, 7), (8, 5, 17)])
def test_a_prior_sees_as_many_rows_up_as_its_layers_and_kernel_allow(layers, kernel, reach):
    """The first layer sees k//2 + 1 rows up, each later one k//2 more: two_level.py's bottom
    priors, 32 6 3 before and 32 8 5 now, reach 7 and 17 rows (README, "a bottom prior that
    sees further"). Changing the whole row `reach` rows above (r, c) moves its logits; the row
    one further, not at all (masked-out inputs have no weights, so exactly 0). Through 8 gated
    layers of a fresh prior the change is small (about 2e-7 on logits of about 0.07, still some
    30 float32 steps), hence a whole row and any change."""
    grid = reach + 2
    prior = make_prior(grid=grid, layers=layers, kernel=kernel)
    codes = np.random.default_rng(1).integers(0, 10, (1, grid, grid)).astype("int32")
    row, column = grid - 1, grid // 2
    base = prior(codes).numpy()[0, row, column]
    for rows_up, seen in ((reach, True), (reach + 1, False)):
        changed = codes.copy()
        changed[0, row - rows_up] = (changed[0, row - rows_up] + 1) % 10
        effect = np.abs(prior(changed).numpy()[0, row, column] - base).max()
        assert (effect > 0) == seen, f"the row {rows_up} up: effect {effect}"


@pytest.mark.parametrize("kernel", [3, 5])
def test_the_samplers_cached_logits_equal_the_full_map_logits(kernel):
    """The sampler's caches (the last k//2 + 1 rows and columns of every block's input) give
    exactly the logits of the whole-map forward pass at every position, also where the 3
    layers' reach ends far from the top and left edges. Teacher forcing runs the sampler's own
    computation (`_raster`) on given codes."""
    prior = make_prior(grid=12, layers=3, kernel=kernel)
    codes = np.random.default_rng(2).integers(0, 10, (2, 12, 12)).astype("int32")
    np.testing.assert_allclose(prior.teacher_forced_logits(codes).numpy(),
                               prior(codes).numpy(), atol=1e-5)


def test_dropout_acts_in_training_only_and_the_sampler_never_drops():
    """With dropout 0.5, two training-mode losses differ (features are dropped at random);
    evaluation is deterministic, the sampler's logits are the whole-map ones, and the rate
    is saved with the model."""
    prior = make_prior(grid=6, layers=3, dropout=0.5)
    codes = np.random.default_rng(4).integers(0, 10, (4, 6, 6)).astype("int32")
    trained = [float(prior.bits_per_code(codes, training=True)) for _ in range(2)]
    assert trained[0] != trained[1]
    assert float(prior.bits_per_code(codes)) == float(prior.bits_per_code(codes))
    np.testing.assert_allclose(prior.teacher_forced_logits(codes).numpy(),
                               prior(codes).numpy(), atol=1e-5)
    assert prior.get_config()["dropout"] == 0.5
    assert all(block.get_config()["dropout"] == 0.5 for block in prior.blocks)


def test_masked_convolution_rejects_an_unknown_mask():
    with pytest.raises(ValueError, match="mask_type A|B"):
        MaskedConv2D(4, 3, "vertical", "C")


def test_a_few_prior_training_steps_lower_its_loss():
    """Code maps with a learnable structure (each row one code, rows counting up) go from
    log2 K bits per code towards far less in a few steps."""
    prior = make_prior(grid=6, K=8, layers=2)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2))
    starts = np.random.default_rng(3).integers(0, 8, 32)
    codes = ((starts[:, None, None] + np.arange(6)[None, :, None]) % 8
             * np.ones((1, 1, 6), int)).astype("int32")
    before = float(prior.bits_per_code(codes))
    assert abs(before - 3.0) < 0.3  # an untrained prior is close to uniform over 8 codes
    prior.fit(codes, epochs=30, batch_size=32, verbose=0)
    assert float(prior.bits_per_code(codes)) < 0.5 * before


def test_sampling_gives_codes_in_range_of_the_right_shape_reproducibly():
    prior = make_prior(grid=5, K=7, layers=2)
    samples = prior.sample(3, temperature=1.0, seed=4).numpy()
    assert samples.shape == (3, 5, 5) and samples.dtype == np.int32
    assert samples.min() >= 0 and samples.max() < 7
    np.testing.assert_array_equal(samples, prior.sample(3, temperature=1.0, seed=4).numpy())
    assert len(np.unique(samples)) > 1  # an untrained prior draws many different codes
    with pytest.raises(ValueError, match="temperature must be > 0"):
        prior.sample(1, temperature=0.0)


def test_top_k_sampling_draws_only_the_k_likeliest_codes():
    """top_k=1 is greedy: the same maps for every seed, each code the argmax of its logits
    given the codes before it. top_k=3 draws only codes ranked 1-3 at their position."""
    prior = make_prior(grid=5, K=9, layers=3)
    greedy = prior.sample(4, seed=1, top_k=1).numpy()
    np.testing.assert_array_equal(greedy, prior.sample(4, seed=2, top_k=1).numpy())
    np.testing.assert_array_equal(greedy, prior(greedy).numpy().argmax(-1))
    drawn = prior.sample(64, seed=3, top_k=3).numpy()
    logits = prior(drawn).numpy()
    rank = (logits > np.take_along_axis(logits, drawn[..., None], -1)).sum(-1)
    assert rank.max() <= 2 and rank.max() > 0  # within the top 3, and not only the top 1
    with pytest.raises(ValueError, match="top_k must be 0"):
        prior.sample(1, top_k=10)


def test_sampling_follows_what_the_prior_learned():
    """Trained on maps that are all code 2, samples at a low temperature are all code 2."""
    prior = make_prior(grid=4, K=5, layers=2)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2))
    prior.fit(np.full((16, 4, 4), 2, "int32"), epochs=30, batch_size=16, verbose=0)
    assert (prior.sample(4, temperature=0.5, seed=0).numpy() == 2).all()


def test_samples_follow_a_learned_dependence_on_the_codes_drawn_before():
    """Each row starts with a random code and counts up by one (mod K): every code depends on
    the one just drawn. The sampler must feed each pick back in; one that did not would keep
    conditioning on its initial zeros and could not follow the rows' random starts."""
    prior = make_prior(grid=4, K=5, layers=2)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2))
    starts = np.random.default_rng(6).integers(0, 5, (256, 4, 1))
    prior.fit(((starts + np.arange(4)) % 5).astype("int32"), epochs=40, batch_size=64,
              verbose=0)
    samples = prior.sample(32, temperature=0.5, seed=1).numpy()
    follows = samples[:, :, 1:] == (samples[:, :, :-1] + 1) % 5
    assert follows.mean() > 0.95
    assert len(np.unique(samples[:, :, 0])) >= 4  # row starts still vary: no fixed pattern


def test_prior_saves_and_loads_as_keras_file(tmp_path):
    prior = make_prior(grid=4, K=5, layers=2, dropout=0.25)
    prior.save(tmp_path / "prior.keras")
    loaded = keras.models.load_model(tmp_path / "prior.keras")
    codes = np.random.default_rng(5).integers(0, 5, (2, 4, 4)).astype("int32")
    np.testing.assert_allclose(loaded(codes).numpy(), prior(codes).numpy(), atol=1e-6)
    assert (loaded.get_config()["layers"], loaded.get_config()["dropout"]) == (2, 0.25)


def test_a_prior_saved_before_it_moved_out_of_modules_py_still_loads():
    """tests/fixtures holds a tiny prior saved by modules.py before the move (its config says
    module "modules"); the registered names are unchanged, so it loads with its weights."""
    loaded = keras.models.load_model(FIXTURES / "prior_saved_from_modules_py.keras")
    assert isinstance(loaded, PixelCNNPrior)
    codes = np.random.default_rng(0).integers(0, 5, (8, 4, 4)).astype("int32")[:2]
    np.testing.assert_allclose(loaded(codes).numpy(),
                               np.load(FIXTURES / "prior_saved_from_modules_py_logits.npy"),
                               atol=1e-6)
    assert loaded.get_config()["dropout"] == 0.0  # saved before dropout existed: none


def make_conditional_prior(grid=6, K=6, layers=3, condition_grid=3, condition_K=4):
    keras.utils.set_random_seed(0)
    return PixelCNNPrior(grid_size=grid, codebook_size=K, width=8, layers=layers,
                         kernel_size=3, position_dim=4, condition_grid=condition_grid,
                         condition_codebook=condition_K)


def test_a_conditional_prior_sees_its_condition_and_only_earlier_codes(tmp_path):
    """The bottom prior of two_level.py: the logits at (0, 0) already depend on the condition
    map, never on the prior's own later codes; the sampler's cached logits equal the whole-map
    ones; it saves and loads; and it refuses to run without its condition."""
    prior = make_conditional_prior()
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 6, (2, 6, 6)).astype("int32")
    condition = rng.integers(0, 4, (2, 3, 3)).astype("int32")
    base = prior(codes, condition).numpy()
    other_condition = condition.copy()
    other_condition[:, 0, 0] = (other_condition[:, 0, 0] + 1) % 4
    assert np.abs(prior(codes, other_condition).numpy()[:, 0, 0] - base[:, 0, 0]).max() > 1e-6
    for position in range(36):  # a code changed: no logit at or before it moves
        later = codes.reshape(2, 36).copy()
        later[:, position] = (later[:, position] + 1) % 6
        effect = np.abs(prior(later.reshape(2, 6, 6), condition).numpy() - base).max(axis=(0, 3))
        assert np.all(effect.ravel()[:position + 1] == 0)
        assert position == 35 or effect.ravel()[position + 1:].max() > 1e-6
    np.testing.assert_allclose(prior.teacher_forced_logits(codes, condition).numpy(), base,
                               atol=1e-5)
    prior.save(tmp_path / "conditional.keras")
    loaded = keras.models.load_model(tmp_path / "conditional.keras")
    np.testing.assert_allclose(loaded(codes, condition).numpy(), base, atol=1e-6)
    with pytest.raises(ValueError, match="needs a condition"):
        prior(codes)
    with pytest.raises(ValueError, match="needs a condition"):
        prior.sample(2)
    with pytest.raises(ValueError, match="takes none"):
        make_prior()(codes, condition)
    with pytest.raises(ValueError, match="go together"):
        PixelCNNPrior(grid_size=6, codebook_size=6, condition_grid=3)


def test_a_conditional_prior_learns_and_samples_what_its_condition_says():
    """Each 6x6 map is its random 3x3 condition upsampled 2x: once trained, greedy samples
    (top_k=1) reproduce the upsampled condition they are given, so the sampler feeds the
    condition to every position."""
    prior = make_conditional_prior(layers=2)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2))
    condition = np.random.default_rng(8).integers(0, 4, (256, 3, 3)).astype("int32")
    codes = condition.repeat(2, axis=1).repeat(2, axis=2)
    pairs = tf.data.Dataset.from_tensor_slices((codes, condition)).batch(64)  # two_level's
    prior.fit(pairs, epochs=30, verbose=0)
    assert float(prior.bits_per_code(codes[:32], condition[:32])) < 0.1
    fresh = np.random.default_rng(9).integers(0, 4, (16, 3, 3)).astype("int32")
    drawn = prior.sample(16, seed=0, top_k=1, condition=fresh).numpy()
    assert (drawn == fresh.repeat(2, axis=1).repeat(2, axis=2)).mean() > 0.98
