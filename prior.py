"""Stage two: a gated PixelCNN prior over the VQ-VAE's code maps (van den Oord et al. 2016,
"Conditional Image Generation with PixelCNN Decoders"), trained on the codes of training
slices, and its sampler.

Shapes: codes (B, h, w) int32 in [0, K); logits (B, h, w, K) float32. Every layer is
registered in the same Keras package as modules.py's ("vqvae"), under the names it had when it
lived there, so .keras files saved before the move still load once this module is imported.
"""

import math

import keras
import tensorflow as tf
from keras import layers, ops

from modules import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedConv2D(layers.Layer):
    """A masked convolution of the gated PixelCNN, stored as only its unmasked part.

    A masked k x k kernel has zeros wherever the mask says so; this layer keeps only the
    rectangle of weights the mask lets through and pads the input so the output at (r, c) sees
    exactly the inputs marked x (k = 3, rows r-2..r; o: the output position, not seen;
    O: seen; .: masked out):

        vertical A    vertical B    horizontal A    horizontal B
          x x x         . . .
          x x x         x x x
          . o .         x O x         x x o            x O

    Vertical: a (k//2 + 1) x k kernel; horizontal: 1 x (k//2 + 1). Type A shifts the window one
    row down (vertical) or one column right (horizontal) so the position itself is excluded. It
    is used once, on the code embeddings, so no logit ever sees its own code; type B after that.
    """

    def __init__(self, filters, kernel_size=3, stack="vertical", mask_type="B", **kwargs):
        super().__init__(**kwargs)
        if stack not in ("vertical", "horizontal") or mask_type not in ("A", "B"):
            raise ValueError(f"stack must be vertical|horizontal and mask_type A|B, "
                             f"got {stack!r}, {mask_type!r}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and at least 3, got {kernel_size}")
        self.filters, self.kernel_size, self.stack, self.mask_type = (filters, kernel_size,
                                                                      stack, mask_type)
        half = kernel_size // 2
        shape = (half + 1, kernel_size) if stack == "vertical" else (1, half + 1)
        self.conv = layers.Conv2D(filters, shape, padding="valid")
        shift = 1 if mask_type == "A" else 0
        # (top, bottom), (left, right) padding; a negative shift crops the far side
        self.pads = ([[half + shift, -shift], [half, half]] if stack == "vertical"
                     else [[0, 0], [half + shift, -shift]])

    def call(self, x):
        (top, bottom), (left, right) = self.pads
        x = ops.pad(x, [[0, 0], [top, max(bottom, 0)], [left, max(right, 0)], [0, 0]])
        x = x[:, :ops.shape(x)[1] + bottom] if bottom < 0 else x  # drop the row shifted out
        x = x[:, :, :ops.shape(x)[2] + right] if right < 0 else x
        return self.conv(x)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "stack": self.stack, "mask_type": self.mask_type}


def gate(x):
    """tanh(a) * sigmoid(b) for x = [a, b] split on channels: (..., 2F) -> (..., F)."""
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedBlock(layers.Layer):
    """One gated PixelCNN layer: a vertical stack (rows above) and a horizontal stack (the row
    so far), F channels each. With p the position embedding (1, h, w, P):

        v_pre = vconv(v) + Wv p                     (B, h, w, 2F)
        v'    = gate(v_pre)                         (B, h, w, F)
        h_pre = hconv(h) + Wvh v_pre + Wh p         (B, h, w, 2F)
        h'    = h + W1 gate(h_pre)                  (no residual in the type A layer)

    v at row r only ever depends on codes in rows < r, so the horizontal stack may add it at the
    same position. The position term (a learned map, not data) tells every layer where it is
    in the slice, which the aligned, centred brains make very informative.
    """

    def __init__(self, filters, kernel_size=3, mask_type="B", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.mask_type = filters, kernel_size, mask_type
        self.vconv = MaskedConv2D(2 * filters, kernel_size, "vertical", mask_type)
        self.hconv = MaskedConv2D(2 * filters, kernel_size, "horizontal", mask_type)
        self.v_position = layers.Dense(2 * filters)
        self.h_position = layers.Dense(2 * filters, use_bias=False)
        self.v_to_h = layers.Dense(2 * filters, use_bias=False)
        self.h_out = layers.Dense(filters)

    def vertical(self, v, position):
        """-> (v' (B, h, w, F), link (B, h, w, 2F)): what the horizontal stack adds."""
        v_pre = self.vconv(v) + self.v_position(position)
        return gate(v_pre), self.v_to_h(v_pre) + self.h_position(position)

    def horizontal(self, h, link):
        out = self.h_out(gate(self.hconv(h) + link))
        return out if self.mask_type == "A" else h + out

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "mask_type": self.mask_type}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelCNNPrior(keras.Model):
    """p(codes) = prod_i p(code_i | codes before i), in raster order over an h x w code map.

    codes (B, h, w) int32 -> logits (B, h, w, K) float32: embedding, one type A gated block,
    layers - 1 type B blocks, then ReLU-1x1-ReLU-1x1 to K logits. Trained by cross-entropy,
    reported in bits per code (log2 K for a uniform guess). `sample` draws new code maps.
    """

    def __init__(self, grid_size=32, codebook_size=512, width=64, layers=12, kernel_size=3,
                 position_dim=16, **kwargs):
        super().__init__(**kwargs)
        self.hparams = dict(grid_size=grid_size, codebook_size=codebook_size, width=width,
                            layers=layers, kernel_size=kernel_size, position_dim=position_dim)
        self.grid_size, self.codebook_size = grid_size, codebook_size
        self.embed = keras.layers.Embedding(codebook_size, width)
        self.position = self.add_weight(shape=(1, grid_size, grid_size, position_dim),
                                        initializer=keras.initializers.RandomNormal(0, 0.1),
                                        name="position")
        self.blocks = [GatedBlock(width, kernel_size, "A" if i == 0 else "B", name=f"gated_{i}")
                       for i in range(layers)]
        self.head = [keras.layers.Dense(width),
                     keras.layers.Dense(codebook_size, dtype="float32")]
        # rows above r that the vertical stack reaches: k//2 + 1 for the type A layer, k//2 more
        # per type B layer; sampling recomputes the vertical stack over just that many rows
        self.reach = (kernel_size // 2) * layers + 1
        self.bits = keras.metrics.Mean(name="bits_per_code")
        self.build((None, grid_size, grid_size))

    def build(self, input_shape):
        self.call(ops.zeros((1, *input_shape[1:]), "int32"))  # creates every weight once

    @property
    def metrics(self):
        return [self.bits]

    def call(self, codes):
        """codes (B, h, w) -> logits (B, h, w, K)."""
        x = self.embed(codes)
        return self._head(x, self._links(x, self.position))

    def _links(self, x, position):
        """The vertical stack over x: one link (B, rows, w, 2F) per block."""
        v, links = x, []
        for block in self.blocks:
            v, link = block.vertical(v, position)
            links.append(link)
        return links

    def _head(self, x, links):
        """The horizontal stack and output head over x (B, rows, w, F) -> logits."""
        h = x
        for block, link in zip(self.blocks, links):
            h = block.horizontal(h, link)
        for dense in self.head:
            h = dense(ops.relu(h))
        return h

    def row_links(self, codes, row):
        """The vertical stack's links for one row (each (B, 1, w, 2F)), computed only from the
        `reach` rows above it: exactly what the full map gives, at a fraction of the cost."""
        start = ops.maximum(row - self.reach, 0)
        window = codes[:, start:row + 1]
        links = self._links(self.embed(window), self.position[:, start:row + 1])
        return [link[:, -1:] for link in links]

    def row_logits(self, row_codes, links):
        """row_codes (B, w) and that row's links -> logits (B, w, K) for the whole row."""
        return self._head(self.embed(row_codes[:, None]), links)[:, 0]

    def bits_per_code(self, codes, training=False):
        """Mean cross-entropy of the codes under the model, in bits."""
        logits = self(codes, training=training)
        nats = keras.losses.sparse_categorical_crossentropy(codes, logits, from_logits=True)
        return ops.mean(nats) / math.log(2.0)

    def train_step(self, codes):
        with tf.GradientTape() as tape:
            loss = self.bits_per_code(codes, training=True)
            scaled_loss = self.optimizer.scale_loss(loss)  # for mixed_float16, as in VQVAE
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.bits.update_state(loss, sample_weight=ops.shape(codes)[0])  # weigh by maps
        return {"bits_per_code": self.bits.result()}

    def test_step(self, codes):
        self.bits.update_state(self.bits_per_code(codes), sample_weight=ops.shape(codes)[0])
        return {"bits_per_code": self.bits.result()}

    def sampler(self, count, temperature=1.0, seed=None):
        """A traced function that draws `count` code maps (count, h, w) int32 per call, all in
        parallel, in raster order. Tracing takes seconds, so it is done here, once.

        Each step samples code (r, c) from softmax(logits / temperature) with
        keras.random.categorical. Per row the vertical stack runs once (over `reach` rows); per
        position only the horizontal stack and the head run, over the one row.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        generator = keras.random.SeedGenerator(seed)
        size = self.grid_size

        @tf.function
        def draw():
            codes = tf.zeros((count, size, size), tf.int32)
            for r in tf.range(size):
                links = self.row_links(codes, r)
                row = codes[:, r]
                for c in tf.range(size):
                    logits = tf.cast(self.row_logits(row, links)[:, c], tf.float32)
                    picked = keras.random.categorical(logits / temperature, 1, dtype="int32",
                                                      seed=generator)
                    row = tf.where(tf.range(size)[None] == c, picked, row)
                codes = tf.where(tf.range(size)[None, :, None] == r, row[:, None], codes)
            return codes

        draw.get_concrete_function()
        return draw

    def sample(self, count, temperature=1.0, seed=None):
        """`count` new code maps (count, h, w) int32; see `sampler`."""
        return self.sampler(count, temperature, seed)()

    def get_config(self):
        return {**super().get_config(), **self.hparams}
