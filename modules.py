"""The VQ-VAE: encoder, vector quantizer, decoder, and the Keras model that trains them.

Shapes use B for batch, H x W for the image, h x w for the latent grid (H / downsample),
D for the code dimension and K for the codebook size. Images are float32 in [0, 1].

    images (B, H, W, 1) -> Encoder -> z_e (B, h, w, D) -> VectorQuantizer -> z_q (B, h, w, D)
                        -> Decoder -> reconstructions (B, H, W, 1)

Every layer has `get_config` and is registered, so after `import modules`,
`keras.models.load_model("out/best.keras")` rebuilds the model with its codebook state.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from distribute import never_empty, replica_context, results_over_replicas, \
    scale_for_replicas, sum_over_replicas

PACKAGE = "vqvae"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(layers.Layer):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))): keeps the shape (B, h, w, C)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv3 = layers.Conv2D(filters, 3, padding="same", activation="relu")
        self.conv1 = layers.Conv2D(filters, 1)

    def call(self, x):
        return x + self.conv1(self.conv3(ops.relu(x)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def stage_widths(width, downsample):
    """Channels per resolution stage, finest first: width=64, downsample=8 -> [16, 32, 64]."""
    stages = int(math.log2(downsample))
    if 2**stages != downsample or stages < 1:
        raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
    return [max(width // 2 ** (stages - 1 - i), 8) for i in range(stages)]


@keras.saving.register_keras_serializable(package=PACKAGE)
class Encoder(layers.Layer):
    """(B, H, W, 1) -> (B, H/downsample, W/downsample, code_dim).

    One stride-2 3x3 convolution per halving, residual blocks at the latent resolution, and a
    1x1 projection to the code dimension (linear: the quantizer needs unconstrained vectors;
    float32 under any precision policy, like the quantizer).
    """

    def __init__(self, downsample=4, width=64, res_blocks=1, code_dim=32, **kwargs):
        super().__init__(**kwargs)
        self.downsample, self.width = downsample, width
        self.res_blocks, self.code_dim = res_blocks, code_dim
        self.steps = [
            layers.Conv2D(c, 3, strides=2, padding="same", activation="relu")
            for c in stage_widths(width, downsample)
        ]
        self.steps += [ResidualBlock(width) for _ in range(res_blocks)]
        # float32 even under mixed precision: codes are chosen and EMA sums accumulated from
        # these vectors, which bfloat16 would round to 8 significant bits first
        self.project = layers.Conv2D(code_dim, 1, dtype="float32")

    def call(self, x):
        for step in self.steps:
            x = step(x)
        return self.project(ops.relu(x) if self.res_blocks else x)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "width": self.width,
                "res_blocks": self.res_blocks, "code_dim": self.code_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Decoder(layers.Layer):
    """(B, h, w, code_dim) -> (B, h*downsample, w*downsample, 1), the mirror of the Encoder.

    Stride-2 transposed convolutions double the grid up to half the image size; the last
    doubling is sub-pixel (ESPCN): a 3x3 convolution predicts the 2x2 block of output pixels
    under each position as 4 channels and depth_to_space lays them out. That is the arithmetic
    of a transposed convolution to full size followed by a 1-channel convolution
    (`subpixel=False`, this decoder's design before, kept for study.py to compare), but on CPU
    the whole training step is 1.3x faster, and it cannot make checkerboard artefacts. The
    output is linear and float32 under mixed precision; `VQVAE.call` clips it to [0, 1].
    """

    def __init__(self, downsample=4, width=64, res_blocks=1, subpixel=True, **kwargs):
        super().__init__(**kwargs)
        self.downsample, self.width, self.res_blocks = downsample, width, res_blocks
        self.subpixel = subpixel
        widths = stage_widths(width, downsample)  # finest first
        self.steps = [layers.Conv2D(width, 3, padding="same", activation="relu")]
        self.steps += [ResidualBlock(width) for _ in range(res_blocks)]
        self.steps += [
            layers.Conv2DTranspose(c, 3, strides=2, padding="same", activation="relu")
            for c in reversed(widths[1:])
        ]
        if subpixel:
            self.steps.append(layers.Conv2D(widths[0], 3, padding="same", activation="relu"))
            self.to_pixel_blocks = layers.Conv2D(4, 3, padding="same", dtype="float32")
        else:
            self.steps.append(layers.Conv2DTranspose(widths[0], 3, strides=2, padding="same",
                                                     activation="relu"))
            self.to_image = layers.Conv2D(1, 3, padding="same", dtype="float32")

    def call(self, z):
        for step in self.steps:
            z = step(z)
        if self.subpixel:
            return tf.nn.depth_to_space(self.to_pixel_blocks(z), 2)
        return self.to_image(z)

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample, "width": self.width,
                "res_blocks": self.res_blocks, "subpixel": self.subpixel}


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(layers.Layer):
    """Snaps each D-dim vector of z_e to its nearest codebook row e_k (always float32).

    Forward:  k* = argmin_k ||z - e_k||^2,   z_q = e_{k*}
    Gradient: straight through, z_q_st = z + stop_gradient(z_q - z), so dL/dz = dL/dz_q.
    Loss:     beta * ||z - sg(z_q)||^2 (commitment), plus ||sg(z) - z_q||^2 when the codebook is
              learned by gradient (use_ema=False).

    With use_ema=True (default) the codebook is not trained by gradient; each training step
    moves it towards the mean of the vectors assigned to each code (van den Oord et al. 2017,
    appendix A.1; Sonnet's VectorQuantizerEMA):
        ema_count_k <- decay * ema_count_k + (1 - decay) * n_k            n_k: vectors assigned to k
        ema_sum_k   <- decay * ema_sum_k   + (1 - decay) * sum_{z -> k} z
        e_k         <- ema_sum_k / laplace(ema_count)_k
    Laplace smoothing keeps rarely used codes from dividing by ~0.

    Dead codes: `steps_unused_k` counts training steps since code k was last chosen; once it
    reaches `dead_code_steps` the code is re-seeded with an encoder output of the current batch
    (in both codebook modes), drawn with probability proportional to its quantisation error
    ||z - e_{k*}||^2. Vectors the codebook already serves well (the black background, about
    half of every slice) are almost never drawn, so restarted codes go where they are needed
    instead of piling up as near-duplicates of a background code. The counters start at
    `dead_code_steps`, so the first step seeds every unchosen code from data (a data-dependent
    initialisation for free).

    Under a tf.distribute strategy every replica sees part of the global batch, yet all must
    hold the same codebook: n_k and the sums are all-reduced before the EMA step, and restart
    vectors are drawn so that every replica picks the same ones (`_same_pick_everywhere`).
    """

    def __init__(self, codebook_size=512, code_dim=32, beta=0.25, use_ema=True, ema_decay=0.99,
                 dead_code_steps=100, epsilon=1e-5, seed=None, **kwargs):
        kwargs["dtype"] = "float32"  # distances and EMA sums need full precision
        super().__init__(**kwargs)
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.dead_code_steps, self.epsilon, self.seed = dead_code_steps, epsilon, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        K, D = self.codebook_size, self.code_dim
        init = keras.initializers.VarianceScaling(scale=1.0, distribution="uniform", seed=self.seed)
        self.codebook = self.add_weight(shape=(K, D), initializer=init, name="codebook",
                                        trainable=not self.use_ema)
        self.ema_count = self.add_weight(shape=(K,), initializer="ones", name="ema_count",
                                         trainable=False)
        self.ema_sum = self.add_weight(shape=(K, D), initializer="zeros", name="ema_sum",
                                       trainable=False)
        self.ema_sum.assign(self.codebook)  # with count 1, sum/count starts at the codebook
        self.steps_unused = self.add_weight(shape=(K,), name="steps_unused", trainable=False,
                                            initializer=keras.initializers.Constant(
                                                float(self.dead_code_steps)))

    def nearest_codes(self, z_e):
        """(B, h, w, D) -> code indices (B, h, w) int32, by squared Euclidean distance.

        argmin_k ||z - e_k||^2 = argmax_k (2 z.e_k - |e_k|^2), as |z|^2 is the same for every k.
        That is one matmul of [z, 1] with [2 e_k, -|e_k|^2], so the (N, K) score matrix, the
        largest tensor in the model, is written once; and TensorFlow's CPU argmax is ~4x faster
        than its argmin.
        """
        flat = ops.reshape(ops.cast(z_e, "float32"), (-1, self.code_dim))
        flat = ops.concatenate([flat, ops.ones_like(flat[:, :1])], axis=1)
        codes_and_norms = ops.concatenate(
            [2.0 * self.codebook, -ops.sum(self.codebook**2, axis=1, keepdims=True)], axis=1)
        scores = ops.matmul(flat, ops.transpose(codes_and_norms))
        codes = ops.argmax(scores, axis=1)
        return ops.cast(ops.reshape(codes, ops.shape(z_e)[:-1]), "int32")

    def lookup(self, codes):
        """Code indices (B, h, w) -> their vectors (B, h, w, D)."""
        return ops.take(self.codebook, codes, axis=0)

    def call(self, z_e, training=False):
        """z_e (B, h, w, D) -> (z_q_st (B, h, w, D), codes (B, h, w), vq_loss scalar)."""
        codes = self.nearest_codes(ops.stop_gradient(z_e))
        if training:
            self._update_codebook(z_e, codes)
        z_q = self.lookup(codes)
        vq_loss = self.beta * ops.mean((z_e - ops.stop_gradient(z_q)) ** 2)
        if not self.use_ema:
            vq_loss += ops.mean((ops.stop_gradient(z_e) - z_q) ** 2)
        z_q_st = z_e + ops.stop_gradient(z_q - z_e)
        return z_q_st, codes, vq_loss

    def _update_codebook(self, z_e, codes):
        """The EMA step (use_ema only) and dead-code restart; runs in the train step, before
        the lookup, so this step's z_q already uses the updated codebook."""
        K = self.codebook_size
        flat = ops.stop_gradient(ops.reshape(z_e, (-1, self.code_dim)))
        flat_codes = ops.reshape(codes, (-1,))
        counts = sum_over_replicas(code_counts(flat_codes, K))
        errors = ops.sum((flat - self.lookup(flat_codes)) ** 2, axis=1)  # before the EMA step
        if self.use_ema:
            self._ema_step(flat, flat_codes, counts)
        self._restart_dead_codes(flat, counts, errors)

    def _ema_step(self, flat, flat_codes, counts):
        K = self.codebook_size
        sums = sum_over_replicas(ops.segment_sum(flat, flat_codes, num_segments=K))
        decay = self.ema_decay
        self.ema_count.assign(decay * self.ema_count + (1 - decay) * counts)
        self.ema_sum.assign(decay * self.ema_sum + (1 - decay) * sums)
        total = ops.sum(self.ema_count)
        smoothed = (self.ema_count + self.epsilon) / (total + K * self.epsilon) * total
        self.codebook.assign(self.ema_sum / smoothed[:, None])

    def _restart_dead_codes(self, flat, counts, errors):
        """flat (N, D) encoder outputs, counts (K,) codes chosen, errors (N,) squared distance
        of each vector to its code. One candidate per code is drawn with P(i) ~ errors_i (the
        tiny floor keeps a batch with zero error everywhere valid: then P is uniform); only the
        dead codes take theirs."""
        K = self.codebook_size
        unused = ops.where(counts > 0, 0.0, self.steps_unused + 1.0)
        dead = unused >= self.dead_code_steps
        log_weights = ops.log(errors + 1e-12)[None]
        picks = keras.random.categorical(log_weights, K, dtype="int32", seed=self.seed_generator)
        fresh = self._same_pick_everywhere(ops.take(flat, picks[0], axis=0), ops.sum(errors))
        self.codebook.assign(ops.where(dead[:, None], fresh, self.codebook))
        self.ema_sum.assign(ops.where(dead[:, None], fresh, self.ema_sum))
        self.ema_count.assign(ops.where(dead, 1.0, self.ema_count))
        self.steps_unused.assign(ops.where(dead, 0.0, unused))

    def _same_pick_everywhere(self, candidates, error_mass):
        """candidates (K, D), drawn by this replica from its share of the batch, and the total
        error of that share -> the (K, D) restart vectors, identical on every replica.

        Every replica gathers all replicas' candidates and masses and, for each code, picks
        replica r with P(r) = mass_r / sum(mass): the gathered inputs and the seed (the seed
        generator advances in step everywhere) are the same, so the picks are too. Overall
        P(vector i) = P(its replica) * P(i | replica) = error_i / total error, as on one device.
        """
        context = replica_context()
        if context is None:
            return candidates
        K = self.codebook_size
        every_candidate = context.all_gather(candidates, axis=0)  # (replicas * K, D)
        masses = context.all_gather(error_mass[None], axis=0)  # (replicas,)
        replica = keras.random.categorical(ops.log(masses + 1e-12)[None], K, dtype="int32",
                                           seed=self.seed_generator)[0]
        return ops.take(every_candidate, replica * K + ops.arange(K, dtype="int32"), axis=0)

    def get_config(self):
        return {**super().get_config(), "codebook_size": self.codebook_size,
                "code_dim": self.code_dim, "beta": self.beta, "use_ema": self.use_ema,
                "ema_decay": self.ema_decay, "dead_code_steps": self.dead_code_steps,
                "epsilon": self.epsilon, "seed": self.seed}


def code_counts(flat_codes, codebook_size):
    """How often each code occurs: (N,) int -> (K,) float32. A segment sum rather than
    bincount, whose output length depends on the data, which XLA (--jit-compile on) refuses."""
    ones = ops.ones_like(flat_codes, dtype="float32")
    return ops.segment_sum(ones, flat_codes, num_segments=codebook_size)


def code_statistics(codes, codebook_size):
    """Perplexity exp(H(p)) of the code histogram and the fraction of codes used at least once,
    over the global batch when the step runs on several replicas."""
    counts = sum_over_replicas(code_counts(ops.reshape(codes, (-1,)), codebook_size))
    probs = counts / ops.sum(counts)
    entropy = -ops.sum(ops.where(probs > 0, probs * ops.log(ops.maximum(probs, 1e-12)), 0.0))
    return ops.exp(entropy), ops.mean(ops.cast(counts > 0, "float32"))


PSNR_CAP_DB = 100.0  # an exact reconstruction (a blank slice) would otherwise score +inf


def image_quality(images, reconstructions):
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5, data range 1) and PSNR in dB, capped
    at PSNR_CAP_DB: (B,), (B,). Capped, a perfect score stays finite, so any NaN or infinity
    in the logs means that training really broke."""
    ssim = tf.image.ssim(images, reconstructions, max_val=1.0, filter_size=11, filter_sigma=1.5)
    psnr = tf.image.psnr(images, reconstructions, max_val=1.0)
    return ssim, tf.minimum(psnr, PSNR_CAP_DB)


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """The whole autoencoder. `model(images)` returns reconstructions in [0, 1], same shape.

    Training loss = reconstruction + VQ:
        reconstruction = mean((x - x_hat)^2) / data_variance   (the variance of training pixels,
                         so the term is ~1 for a model that predicts the mean and the commitment
                         weight beta keeps the meaning it has in the paper)
        vq             = beta * commitment (+ codebook loss without EMA)
    """

    def __init__(self, image_size=256, downsample=4, width=64, res_blocks=1, code_dim=32,
                 codebook_size=512, beta=0.25, use_ema=True, ema_decay=0.99,
                 dead_code_steps=100, data_variance=1.0, seed=None, subpixel=True, **kwargs):
        super().__init__(**kwargs)
        self.hparams = dict(image_size=image_size, downsample=downsample, width=width,
                            res_blocks=res_blocks, code_dim=code_dim, codebook_size=codebook_size,
                            beta=beta, use_ema=use_ema, ema_decay=ema_decay,
                            dead_code_steps=dead_code_steps, data_variance=data_variance,
                            seed=seed, subpixel=subpixel)
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not divisible by downsample {downsample}")
        if not data_variance > 0:
            raise ValueError(f"data_variance must be positive (it divides the reconstruction "
                             f"loss), got {data_variance}")
        self.codebook_size, self.data_variance = codebook_size, data_variance
        self.encoder = Encoder(downsample, width, res_blocks, code_dim, name="encoder")
        self.quantizer = VectorQuantizer(codebook_size, code_dim, beta, use_ema, ema_decay,
                                         dead_code_steps, seed=seed, name="quantizer")
        self.decoder = Decoder(downsample, width, res_blocks, subpixel, name="decoder")
        names = ["loss", "reconstruction_loss", "vq_loss", "perplexity", "codebook_usage",
                 "ssim", "psnr"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.build((None, image_size, image_size, 1))

    def build(self, input_shape):
        self.forward(ops.zeros((1, *input_shape[1:])))  # creates every weight once

    @property
    def metrics(self):
        return list(self.trackers.values())

    def forward(self, images, training=False):
        """images (B, H, W, 1) -> (raw reconstructions (B, H, W, 1), codes (B, h, w), vq_loss)."""
        z_q, codes, vq_loss = self.quantizer(self.encoder(images), training=training)
        return self.decoder(z_q), codes, vq_loss

    def call(self, images, training=False):
        return ops.clip(self.forward(images, training)[0], 0.0, 1.0)

    def encode(self, images):
        """images (B, H, W, 1) in [0, 1] -> code indices (B, h, w) int32."""
        return self.quantizer.nearest_codes(self.encoder(images))

    def decode_codes(self, codes):
        """code indices (B, h, w) -> images (B, H, W, 1) in [0, 1]."""
        return ops.clip(self.decoder(self.quantizer.lookup(codes)), 0.0, 1.0)

    def encode_all(self, batches):
        """An iterable of image batches -> every code map, (N, h, w) int32 numpy."""
        size = self.hparams["image_size"]
        spec = tf.TensorSpec((None, size, size, 1), tf.float32)
        encode = tf.function(self.encode, input_signature=[spec])  # traced once
        return np.concatenate([encode(batch).numpy() for batch in batches])

    def decode_all(self, codes, batch_size=32):
        """Code maps (N, h, w) -> images (N, H, W, 1) numpy, in batches."""
        return np.concatenate([self.decode_codes(codes[i:i + batch_size]).numpy()
                               for i in range(0, len(codes), batch_size)])

    def _loss_terms(self, images, training):
        reconstructions, codes, vq_loss = self.forward(images, training=training)
        reconstruction_loss = ops.mean((images - reconstructions) ** 2) / self.data_variance
        return reconstructions, codes, reconstruction_loss, vq_loss

    def _record(self, count, codes, reconstruction_loss, vq_loss):
        """Update the trackers with the values of a batch of `count` images, each weighted by
        `count`, so that a tracker holds the mean over images however the batches were split
        across replicas (under a strategy it sums every replica's part on reading). A replica
        handed no images of a last, partial batch adds nothing."""
        weight = ops.cast(count, "float32")
        perplexity, usage = code_statistics(codes[:count], self.codebook_size)
        values = {"loss": reconstruction_loss + vq_loss, "reconstruction_loss": reconstruction_loss,
                  "vq_loss": vq_loss, "perplexity": perplexity, "codebook_usage": usage}
        for name, value in values.items():
            self.trackers[name].update_state(ops.where(weight > 0, value, 0.0),
                                             sample_weight=weight)
        return list(values)

    def train_step(self, images):
        with tf.GradientTape() as tape:
            _, codes, reconstruction_loss, vq_loss = self._loss_terms(images, training=True)
            loss = reconstruction_loss + vq_loss
            # / replicas (the optimizer sums their gradients); x loss scale under
            # mixed_float16 (the LossScaleOptimizer unscales), else x 1
            scaled_loss = self.optimizer.scale_loss(scale_for_replicas(loss))
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        names = self._record(ops.shape(images)[0], codes, reconstruction_loss, vq_loss)
        return results_over_replicas([self.trackers[name] for name in names])

    def test_step(self, images):
        images, count = never_empty(images)
        reconstructions, codes, reconstruction_loss, vq_loss = self._loss_terms(images, False)
        names = self._record(count, codes, reconstruction_loss, vq_loss)
        ssim, psnr = image_quality(images, ops.clip(reconstructions, 0.0, 1.0))
        self.trackers["ssim"].update_state(ssim[:count])
        self.trackers["psnr"].update_state(psnr[:count])
        return results_over_replicas([self.trackers[name] for name in names + ["ssim", "psnr"]])

    def get_config(self):
        return {**super().get_config(), **self.hparams}
