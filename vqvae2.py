"""The two-level code of VQ-VAE-2 (Razavi et al. 2019): a top map that a top prior draws for
the layout, and a bottom map for the detail, drawn by a second prior conditioned on the top
map (two_level.py trains them, predict.py measures them). Shapes for 256 x 256 slices, W
channels, D code dim:

    images (B, 256, 256, 1) -> bottom encoder -> features (B, 64, 64, W)
    features -> top encoder -> quantizer -> z_q top (B, 32, 32, D), top codes (B, 32, 32)
    [features, top decoder(z_q top) (B, 64, 64, W)] -> 1x1 -> quantizer
                                       -> z_q bottom (B, 64, 64, D), bottom codes (B, 64, 64)
    [z_q bottom, upsample(z_q top) (B, 64, 64, D)] -> decoder -> reconstructions

The top code carries the layout, the bottom one the detail the top decoder cannot predict.
Both codebooks have K codes and train by EMA like modules.VectorQuantizer's. A styled top
prior draws a style class first (StyleClasses: each slice's brain brightness and contrast,
binned), so that each sample keeps one style throughout. TwoLevelGenerator packs both maps
(and the style) into one array per slice, so that predict.py measures it as a one-level model.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import metrics
import modules
from modules import PACKAGE, Decoder, Encoder, ResidualBlock, VectorQuantizer

# the top prior's and the bottom prior's sampling temperatures unless given (two_level.py,
# predict.py): a cooler top map (README, "A cooler top prior")
TEMPERATURES = (0.7, 1.0)


def top_and_bottom(temperatures):
    """--temperature's values -> (the top prior's, the bottom prior's): one value sets both. A
    ValueError saying what is wrong unless they are one or two positive numbers below 100."""
    if not 1 <= len(temperatures) <= 2 or not all(0 < t < 100 for t in temperatures):
        raise ValueError(f"--temperature takes one or two (TOP BOTTOM) positive numbers below "
                         f"100, got {' '.join(map(str, temperatures))}")
    return float(temperatures[0]), float(temperatures[-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class TwoLevelVQVAE(modules.VQVAE):
    """The two-level autoencoder above; `model(images)` returns reconstructions in [0, 1].

    It trains and is scored by VQVAE's steps, loss and trackers (its `forward` has the same
    contract): loss = mean((x - x_hat)^2) / data_variance + both quantizers' commitment losses;
    the perplexity and codebook usage tracked are the bottom code's.
    """

    def __init__(self, image_size=256, width=64, res_blocks=1, code_dim=32, codebook_size=512,
                 beta=0.25, ema_decay=0.99, dead_code_steps=100, data_variance=1.0, seed=None,
                 **kwargs):
        keras.Model.__init__(self, **kwargs)  # VQVAE's steps and trackers, not its layers
        self.hparams = dict(image_size=image_size, width=width, res_blocks=res_blocks,
                            code_dim=code_dim, codebook_size=codebook_size, beta=beta,
                            ema_decay=ema_decay, dead_code_steps=dead_code_steps,
                            data_variance=data_variance, seed=seed)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        if not data_variance > 0:
            raise ValueError(f"data_variance must be positive (it divides the reconstruction "
                             f"loss), got {data_variance}")
        self.codebook_size, self.data_variance = codebook_size, data_variance
        quantizer = lambda name, seed: VectorQuantizer(  # noqa: E731
            codebook_size, code_dim, beta, True, ema_decay, dead_code_steps, seed=seed, name=name)
        self.bottom_encoder = Encoder(4, width, res_blocks, width, name="bottom_encoder")
        self.top_encoder = Encoder(2, width, res_blocks, code_dim, name="top_encoder")
        self.top_quantizer = quantizer("top_quantizer", seed)
        self.top_decoder = [layers.Conv2D(width, 3, padding="same", activation="relu")]
        self.top_decoder += [ResidualBlock(width) for _ in range(res_blocks)]
        self.top_decoder.append(layers.Conv2DTranspose(width, 4, strides=2, padding="same",
                                                       activation="relu"))
        self.bottom_project = layers.Conv2D(code_dim, 1, dtype="float32")  # like Encoder's
        self.bottom_quantizer = quantizer("bottom_quantizer", None if seed is None else seed + 1)
        self.top_upsample = layers.Conv2DTranspose(code_dim, 4, strides=2, padding="same")
        self.decoder = Decoder(4, width, res_blocks, name="decoder")
        names = ["loss", "reconstruction_loss", "vq_loss", "perplexity", "codebook_usage",
                 "ssim", "psnr"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.build((None, image_size, image_size, 1))

    def forward(self, images, training=False):
        """images (B, H, W, 1) -> (raw reconstructions (B, H, W, 1), bottom codes (B, H/4, W/4),
        vq_loss of both levels)."""
        features = self.bottom_encoder(images)
        z_q_top, _, top_loss = self.top_quantizer(self.top_encoder(features), training=training)
        z_q_bottom, bottom_codes, bottom_loss = self.bottom_quantizer(
            self._bottom_vectors(features, z_q_top), training=training)
        return self._decode(z_q_top, z_q_bottom), bottom_codes, top_loss + bottom_loss

    def _bottom_vectors(self, features, z_q_top):
        """The bottom encoder's features and what the top code already says about them."""
        top = z_q_top
        for layer in self.top_decoder:
            top = layer(top)
        return self.bottom_project(ops.concatenate([features, ops.cast(top, features.dtype)],
                                                   axis=-1))

    def _decode(self, z_q_top, z_q_bottom):
        top = ops.cast(self.top_upsample(z_q_top), z_q_bottom.dtype)
        return self.decoder(ops.concatenate([z_q_bottom, top], axis=-1))

    def encode(self, images):
        """images (B, H, W, 1) -> (top codes (B, H/8, W/8), bottom codes (B, H/4, W/4))."""
        features = self.bottom_encoder(images)
        top_codes = self.top_quantizer.nearest_codes(self.top_encoder(features))
        z_q_top = self.top_quantizer.lookup(top_codes)
        bottom = self.bottom_quantizer.nearest_codes(self._bottom_vectors(features, z_q_top))
        return top_codes, bottom

    def decode_codes(self, top_codes, bottom_codes):
        """(top codes, bottom codes) -> images (B, H, W, 1) in [0, 1]."""
        z_q_top = self.top_quantizer.lookup(top_codes)
        z_q_bottom = self.bottom_quantizer.lookup(bottom_codes)
        return ops.clip(self._decode(z_q_top, z_q_bottom), 0.0, 1.0)

    def encode_all(self, batches):
        """An iterable of image batches -> (top code maps, bottom code maps), int32 numpy."""
        size = self.hparams["image_size"]
        spec = tf.TensorSpec((None, size, size, 1), tf.float32)
        encode = tf.function(self.encode, input_signature=[spec])  # traced once
        pairs = [[codes.numpy() for codes in encode(batch)] for batch in batches]
        return tuple(np.concatenate(level) for level in zip(*pairs))

    def decode_all(self, top_codes, bottom_codes, batch_size=32):
        """Code maps of both levels -> images (N, H, W, 1) numpy, in batches."""
        return np.concatenate([
            self.decode_codes(top_codes[i:i + batch_size], bottom_codes[i:i + batch_size])
            .numpy() for i in range(0, len(top_codes), batch_size)])


class StyleClasses:
    """A slice's style: which of `bins` quantile bins of the training slices it falls in for
    each of the S measures of metrics.brain_styles (brightness, contrast): bins^S classes, the
    1x1 condition map of a styled top prior (--style-bins). Drawn code by code, an
    unconditioned top prior mixes the brightness and contrast of many slices in each sample,
    so its samples vary less between themselves than real slices do; drawing a style first
    (from the training slices' frequencies), then a top map in that style, keeps each sample
    in one. (A third measure, the share of CSF below 0.2, was tried and dropped: its samples
    were less varied, README "Why the samples are less varied".)"""

    def __init__(self, train_styles, bins):
        self.bins, self.count = bins, bins ** train_styles.shape[1]
        self.edges = np.quantile(train_styles, np.arange(1, bins) / bins, axis=0)  # (bins-1, S)
        counts = np.bincount(self(train_styles), minlength=self.count)
        self.frequencies = counts / counts.sum()

    def get_config(self):
        """What a run keeps (two_level.py's run.json) so that predict.py draws the same styles."""
        return {"bins": self.bins, "edges": self.edges.tolist(),
                "frequencies": self.frequencies.tolist()}

    @classmethod
    def from_config(cls, config):
        """The StyleClasses that get_config described, without the training styles."""
        classes = cls.__new__(cls)
        classes.bins, classes.edges = config["bins"], np.array(config["edges"], np.float64)
        classes.frequencies = np.array(config["frequencies"], np.float64)
        classes.count = len(classes.frequencies)
        return classes

    def __call__(self, styles):
        """brain_styles (N, S) -> style classes (N,) int32 in [0, bins^S): the bins' indices
        as the digits of a base-`bins` number, the first measure's the most significant."""
        classes = np.zeros(len(styles), np.int64)
        for measure, edges in enumerate(self.edges.T):
            classes = classes * self.bins + np.searchsorted(edges, styles[:, measure], "right")
        return classes.astype(np.int32)

    def draw(self, count, rng):
        """`count` style classes (count,) int32 drawn with the training slices' frequencies."""
        return rng.choice(self.count, count, p=self.frequencies).astype(np.int32)


class TwoLevelGenerator:
    """Both levels' code maps packed into one (N, h_top * w_top + h_bottom * w_bottom) array
    per slice (top first), so that metrics.sample_report measures a two-level model as it
    does a one-level one: it plays both the VQ-VAE (encode_all, decode_all, codebook_size,
    and `levels`, the packed columns of each level, which the metrics' baselines and shuffled
    codes treat one level at a time) and the prior (bits_per_code: the mean over every code of
    both levels). With `styles` (StyleClasses; the top prior then conditioned on them), each
    slice's style class is packed last, in a column of no level: it is a condition, not a
    code, so it is neither shuffled nor scored."""

    def __init__(self, vqvae, top_prior, bottom_prior, styles=None):
        self.vqvae, self.top_prior, self.bottom_prior = vqvae, top_prior, bottom_prior
        self.styles = styles
        if (styles is None) == top_prior.conditional:
            raise ValueError("a top prior conditioned on style classes needs their StyleClasses, "
                             "an unconditioned one takes none")
        self.codebook_size = vqvae.codebook_size
        self.top_shape = (top_prior.grid_size,) * 2
        self.bottom_shape = (bottom_prior.grid_size,) * 2
        split = int(np.prod(self.top_shape))
        self.levels = (slice(0, split), slice(split, split + int(np.prod(self.bottom_shape))))

    def pack(self, top_codes, bottom_codes, style=None):
        count = len(top_codes)
        columns = [np.reshape(top_codes, (count, -1)), np.reshape(bottom_codes, (count, -1))]
        if self.styles is not None:
            columns.append(np.reshape(style, (count, 1)))
        return np.concatenate(columns, axis=1)

    def unpack(self, packed):
        """-> (top codes, bottom codes, style conditions (N, 1, 1) or None)."""
        packed, (top, bottom) = np.asarray(packed), self.levels
        style = packed[:, -1].reshape(-1, 1, 1) if self.styles is not None else None
        return (packed[:, top].reshape(-1, *self.top_shape),
                packed[:, bottom].reshape(-1, *self.bottom_shape), style)

    def encode_all(self, batches):
        batches, style = [np.asarray(batch) for batch in batches], None
        if self.styles is not None:
            style = self.styles(metrics.brain_styles(np.concatenate(batches)))
        return self.pack(*self.vqvae.encode_all(batches), style)

    def decode_all(self, packed, batch_size=32):
        return self.vqvae.decode_all(*self.unpack(packed)[:2], batch_size)

    def level_bits(self, packed):
        """Packed code maps -> (bits per top code, bits per bottom code) under the priors."""
        top, bottom, style = self.unpack(packed)
        return (float(self.top_prior.bits_per_code(top, style)),
                float(self.bottom_prior.bits_per_code(bottom, top)))

    def bits_per_code(self, packed):
        return self.over_levels(*self.level_bits(packed))

    def over_levels(self, top_bits, bottom_bits):
        """Bits per top code and per bottom code -> bits per code over every code of both."""
        top_count, bottom_count = np.prod(self.top_shape), np.prod(self.bottom_shape)
        return (top_bits * top_count + bottom_bits * bottom_count) / (top_count + bottom_count)

    def sampler(self, count, temperature=1.0, seed=None, top_k=0, top_temperature=None):
        """A function that draws `count` packed code maps per call: style classes if styled,
        the top prior's maps (in those styles) at `top_temperature` (default: `temperature`),
        then the bottom prior's conditioned on them at `temperature`, each code from its
        `top_k` likeliest (0: all; PixelCNNPrior.sampler); both samplers traced here, once."""
        top_temperature = temperature if top_temperature is None else top_temperature
        draw_top = self.top_prior.sampler(count, top_temperature, seed, top_k)
        draw_bottom = self.bottom_prior.sampler(count, temperature,
                                                None if seed is None else seed + 1, top_k)
        rng = np.random.default_rng(seed)

        def draw():
            style = None
            if self.styles is not None:
                style = self.styles.draw(count, rng)
                top = draw_top(tf.constant(style.reshape(-1, 1, 1)))
            else:
                top = draw_top()
            return self.pack(top.numpy(), draw_bottom(top).numpy(), style)

        return draw
