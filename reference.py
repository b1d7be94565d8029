"""The yardstick: the keras.io VQ-VAE example (S. Paul, 2021) at our image size, which bench.py
times against our model and study.py trains beside it. Only its architecture and loss are
followed; the code is ours.

    encoder   Conv 3x3/2 32 ReLU -> Conv 3x3/2 64 ReLU -> Conv 1x1 to D = 16
    quantizer K = 64 codes by argmin distance, straight through (ReferenceQuantizer)
    decoder   ConvT 3x3/2 64 ReLU -> ConvT 3x3/2 32 ReLU -> ConvT 3x3 to 1 channel
"""

import keras
import tensorflow as tf
from keras import layers, ops


class ReferenceQuantizer(layers.Layer):
    """The keras.io example's VectorQuantizer, float32 under any policy (like ours):
    z (B, h, w, D) -> (z + sg(z_q - z), beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2)."""

    def __init__(self, codes=64, beta=0.25, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.codes, self.beta = codes, beta

    def build(self, input_shape):
        self.codebook = self.add_weight(shape=(input_shape[-1], self.codes), name="codebook",
                                        initializer="random_uniform")

    def call(self, z):
        flat = ops.reshape(z, (-1, ops.shape(z)[-1]))
        distances = (ops.sum(flat**2, axis=1, keepdims=True) + ops.sum(self.codebook**2, axis=0)
                     - 2 * ops.matmul(flat, self.codebook))
        one_hot = ops.one_hot(ops.argmin(distances, axis=1), self.codes)
        z_q = ops.reshape(ops.matmul(one_hot, ops.transpose(self.codebook)), ops.shape(z))
        vq_loss = (self.beta * ops.mean((ops.stop_gradient(z_q) - z) ** 2)
                   + ops.mean((z_q - ops.stop_gradient(z)) ** 2))
        return z + ops.stop_gradient(z_q - z), vq_loss


class ReferenceVQVAE(keras.Model):
    """The keras.io example's model (architecture in the module docstring).

    images (B, H, W, 1) in [0, 1] -> reconstructions (B, H, W, 1). The example centres its
    pixels (x - 0.5); this model does so inside, so it takes and returns images like ours
    (uncentred, only 3 of the 64 codes were in use after 150 steps on brain slices).
    Loss = mean((x - x_hat)^2) / data_variance + vq loss. Under a mixed policy the quantizer
    and the last layer stay float32, as in our model, so both compare in the same precision.
    """

    def __init__(self, data_variance, latent_dim=16, codes=64, beta=0.25, **kwargs):
        super().__init__(**kwargs)
        self.data_variance = data_variance
        relu = dict(activation="relu", padding="same")
        self.encoder = keras.Sequential([
            layers.Conv2D(32, 3, strides=2, **relu), layers.Conv2D(64, 3, strides=2, **relu),
            layers.Conv2D(latent_dim, 1, padding="same")])
        self.quantizer = ReferenceQuantizer(codes, beta)
        self.decoder = keras.Sequential([
            layers.Conv2DTranspose(64, 3, strides=2, **relu),
            layers.Conv2DTranspose(32, 3, strides=2, **relu),
            layers.Conv2DTranspose(1, 3, padding="same", dtype="float32")])
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def build(self, input_shape):
        self.forward(ops.zeros((1, *input_shape[1:])))  # creates every weight once

    def forward(self, images):
        """-> (reconstructions (B, H, W, 1), vq_loss scalar)."""
        z_q, vq_loss = self.quantizer(self.encoder(images - 0.5))
        return self.decoder(z_q) + 0.5, vq_loss

    def call(self, images):
        return ops.clip(self.forward(images)[0], 0.0, 1.0)

    def train_step(self, images):
        with tf.GradientTape() as tape:
            reconstructions, vq_loss = self.forward(images)
            loss = ops.mean((images - reconstructions) ** 2) / self.data_variance + vq_loss
            scaled_loss = self.optimizer.scale_loss(loss)  # x loss scale under mixed_float16
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}
