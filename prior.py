"""Stage two: a gated PixelCNN prior over the VQ-VAE's code maps (van den Oord et al. 2016,
"Conditional Image Generation with PixelCNN Decoders"), trained on the codes of training
slices, and its sampler.

Shapes: codes (B, h, w) int32 in [0, K); logits (B, h, w, K) float32; for a conditional
prior, condition maps (B, hc, wc) int32 of another codebook. Every layer is
registered in the same Keras package as modules.py's ("vqvae"), under the names it had when it
lived there, so .keras files saved before the move still load once this module is imported.
"""

import math

import keras
import tensorflow as tf
from keras import layers, ops

from distribute import never_empty, results_over_replicas, scale_for_replicas
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

    def step(self, cache, x):
        """One more output along the stack from a cache of the input (the sampler's way):

            vertical    cache (B, k//2 + 1, w, C), x (B, 1, w, C) -> out (B, 1, w, filters)
            horizontal  cache (B, k//2 + 1, C),    x (B, 1, C)    -> out (B, 1, filters)

        x is the input at the next row (column); the cache drops its oldest one and takes x, so
        it holds the rows (columns) the kernel reaches and the output is the one at x's row
        (column). A zero cache is the zero padding at the top (left) edge. Type A: pass the
        input one row (column) behind, which is how its window is shifted.
        """
        cache = ops.concatenate([cache[:, 1:], x], axis=1)
        if self.stack == "horizontal":
            return cache, self.conv(cache[:, None])[:, 0]
        half = self.kernel_size // 2
        return cache, self.conv(ops.pad(cache, [[0, 0], [0, 0], [half, half], [0, 0]]))

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
    so far), F channels each. With p the position map (1, h, w, P), or for a conditional prior
    the position map and the condition's features (B, h, w, P + F):

        v_pre = vconv(v) + Wv p                     (B, h, w, 2F)
        v'    = gate(v_pre)                         (B, h, w, F)
        h_pre = hconv(h) + Wvh v_pre + Wh p         (B, h, w, 2F)
        h'    = h + W1 dropout(gate(h_pre))         (no residual in the type A layer)

    Dropout (rate `dropout`, training only) zeroes features of the horizontal stack's update;
    evaluation and the sampler never drop anything.

    v at row r only ever depends on codes in rows < r, so the horizontal stack may add it at the
    same position. The position term tells every layer where it is in the slice, which the
    aligned, centred brains make very informative (and, conditioned, what the condition says
    there: it holds no code of this map, so it needs no mask).
    """

    def __init__(self, filters, kernel_size=3, mask_type="B", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.mask_type = filters, kernel_size, mask_type
        self.dropout = layers.Dropout(dropout)
        self.vconv = MaskedConv2D(2 * filters, kernel_size, "vertical", mask_type)
        self.hconv = MaskedConv2D(2 * filters, kernel_size, "horizontal", mask_type)
        self.v_position = layers.Dense(2 * filters)
        self.h_position = layers.Dense(2 * filters, use_bias=False)
        self.v_to_h = layers.Dense(2 * filters, use_bias=False)
        self.h_out = layers.Dense(filters)

    def vertical(self, v, position):
        """-> (v' (B, h, w, F), link (B, h, w, 2F)): what the horizontal stack adds."""
        return self.vertical_from(self.vconv(v), position)

    def vertical_from(self, conv, position):
        """The vertical stack given vconv's output: any shape (..., 2F) that position matches."""
        v_pre = conv + self.v_position(position)
        return gate(v_pre), self.v_to_h(v_pre) + self.h_position(position)

    def horizontal(self, h, link):
        return self.horizontal_from(self.hconv(h), h, link)

    def horizontal_from(self, conv, h, link, sampling=False):
        """The horizontal stack given hconv's output, its input h (..., F) and the link;
        dropout as the surrounding Keras call says (training or not), never when sampling."""
        update = gate(conv + link)
        out = self.h_out(update if sampling else self.dropout(update))
        return out if self.mask_type == "A" else h + out

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "mask_type": self.mask_type,
                "dropout": self.dropout.rate}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelCNNPrior(keras.Model):
    """p(codes) = prod_i p(code_i | codes before i), in raster order over an h x w code map.

    codes (B, h, w) int32 -> logits (B, h, w, K) float32: embedding, one type A gated block,
    layers - 1 type B blocks (each with `dropout` in training), then ReLU-1x1-ReLU-1x1 to K
    logits. Trained by cross-entropy, reported in bits per code (log2 K for a uniform guess).
    `sample` draws new code maps, caching its work so that drawing a map costs about one
    whole-map forward pass.

    Conditional (condition_codebook > 0; the bottom prior of two_level.py): every call also
    takes a condition, a code map (B, condition_grid, condition_grid) of another codebook, all
    known in advance. Its embedding, through a small convolutional net and upsampled to the
    grid, joins the position map (B, h, w, P + F), so every layer sees it where it sees the
    position; no mask is needed, as no code of the condition is ever drawn by this prior.
    """

    def __init__(self, grid_size=32, codebook_size=512, width=64, layers=12, kernel_size=3,
                 position_dim=16, dropout=0.0, condition_grid=0, condition_codebook=0,
                 **kwargs):
        super().__init__(**kwargs)
        self.hparams = dict(grid_size=grid_size, codebook_size=codebook_size, width=width,
                            layers=layers, kernel_size=kernel_size, position_dim=position_dim,
                            dropout=dropout, condition_grid=condition_grid,
                            condition_codebook=condition_codebook)
        self.grid_size, self.codebook_size = grid_size, codebook_size
        self.embed = keras.layers.Embedding(codebook_size, width)
        self.position = self.add_weight(shape=(1, grid_size, grid_size, position_dim),
                                        initializer=keras.initializers.RandomNormal(0, 0.1),
                                        name="position")
        self.conditional = condition_codebook > 0
        if self.conditional != (condition_grid > 0):
            raise ValueError("condition_grid and condition_codebook go together: both > 0 "
                             "for a conditional prior, both 0 for none")
        if self.conditional:
            if grid_size % condition_grid:
                raise ValueError(f"condition_grid must divide grid_size {grid_size}, got "
                                 f"{condition_grid}")
            self.condition_net = [
                keras.layers.Embedding(condition_codebook, width),
                keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
                keras.layers.UpSampling2D(grid_size // condition_grid),
                keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(width, 1)]
        self.blocks = [GatedBlock(width, kernel_size, "A" if i == 0 else "B", dropout,
                                  name=f"gated_{i}") for i in range(layers)]
        self.head = [keras.layers.Dense(width),
                     keras.layers.Dense(codebook_size, dtype="float32")]
        self.bits = keras.metrics.Mean(name="bits_per_code")
        self.build((None, grid_size, grid_size))

    def build(self, input_shape):
        grid = self.hparams["condition_grid"]
        condition = ops.zeros((1, grid, grid), "int32") if self.conditional else None
        self.call(ops.zeros((1, *input_shape[1:]), "int32"), condition)  # every weight, once

    @property
    def metrics(self):
        return [self.bits]

    def call(self, codes, condition=None):
        """codes (B, h, w) [, condition (B, hc, wc)] -> logits (B, h, w, K)."""
        x = self.embed(codes)
        return self._head(x, self._links(x, self.position_map(condition)))

    def position_map(self, condition=None):
        """What every layer adds where it is: the position map (1, h, w, P), or for a
        conditional prior the position map and the condition's features (B, h, w, P + F)."""
        self._check_condition(condition)
        if condition is None:
            return self.position
        features = condition
        for layer in self.condition_net:
            features = layer(features)
        shape = (ops.shape(features)[0], *self.position.shape[1:])
        position = ops.cast(ops.broadcast_to(self.position, shape), features.dtype)
        return ops.concatenate([position, features], axis=-1)

    def _check_condition(self, condition):
        if (condition is None) == self.conditional:
            raise ValueError("a conditional prior needs a condition (the code maps it is "
                             "conditioned on), an unconditional one takes none")

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
        return self._logits(h)

    def _logits(self, h):
        """The output head: h (..., F) -> logits (..., K)."""
        for dense in self.head:
            h = dense(ops.relu(h))
        return h

    def bits_per_code(self, codes, condition=None, training=False):
        """Mean cross-entropy of the codes under the model, in bits."""
        logits = self(codes, condition, training=training)
        nats = keras.losses.sparse_categorical_crossentropy(codes, logits, from_logits=True)
        return ops.mean(nats) / math.log(2.0)

    def train_step(self, data):
        """data: code maps, or (code maps, condition maps) for a conditional prior."""
        codes, condition = data if isinstance(data, tuple) else (data, None)
        with tf.GradientTape() as tape:
            loss = self.bits_per_code(codes, condition, training=True)
            # / replicas (the optimizer sums their gradients); x loss scale for mixed_float16
            scaled_loss = self.optimizer.scale_loss(scale_for_replicas(loss))
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._record(ops.shape(codes)[0], loss)

    def test_step(self, data):
        codes, condition = data if isinstance(data, tuple) else (data, None)
        codes, count = never_empty(codes)
        if condition is not None:
            condition = never_empty(condition)[0]
        return self._record(count, self.bits_per_code(codes, condition))

    def _record(self, count, bits):
        """Weigh by the `count` code maps of the batch, so the result is the mean over maps
        however batches were split across replicas; a replica handed none adds nothing."""
        maps = ops.cast(count, "float32")
        self.bits.update_state(ops.where(maps > 0, bits, 0.0), sample_weight=maps)
        return results_over_replicas([self.bits])

    def sampler(self, count, temperature=1.0, seed=None, top_k=0):
        """A traced function that draws `count` code maps (count, h, w) int32 per call, all in
        parallel, in raster order (a conditional prior's takes the condition maps (count, hc,
        wc) int32). Tracing takes seconds, so it is done here, once.

        Each step samples code (r, c) from softmax(logits / temperature) with
        keras.random.categorical, over only the `top_k` likeliest codes when top_k > 0 (and
        any tied with the k-th; the rest get logit -inf); `_raster` computes those logits with
        caches, at the cost of one whole-map forward pass per map in all.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= top_k <= self.codebook_size:
            raise ValueError(f"top_k must be 0 (off) to {self.codebook_size}, got {top_k}")
        generator = keras.random.SeedGenerator(seed)

        def pick(logits, r, c):
            if top_k:  # (count, K): keep the logits at least as large as the k-th largest
                kth = ops.top_k(logits, top_k, sorted=True)[0][:, -1:]
                logits = ops.where(logits < kth, -math.inf, logits)
            return keras.random.categorical(logits / temperature, 1, dtype="int32",
                                            seed=generator)[:, 0]

        if not self.conditional:
            draw = tf.function(lambda: self._raster(count, pick)[0])
            draw.get_concrete_function()
            return draw
        grid = self.hparams["condition_grid"]
        draw = tf.function(lambda condition: self._raster(count, pick, condition=condition)[0])
        draw.get_concrete_function(tf.TensorSpec((count, grid, grid), tf.int32))
        return draw

    def sample(self, count, temperature=1.0, seed=None, top_k=0, condition=None):
        """`count` new code maps (count, h, w) int32; see `sampler`."""
        self._check_condition(condition)
        draw = self.sampler(count, temperature, seed, top_k)
        return draw(tf.convert_to_tensor(condition, tf.int32)) if self.conditional else draw()

    def teacher_forced_logits(self, codes, condition=None):
        """codes (B, h, w) -> logits (B, h, w, K), computed the sampler's way (`_raster`), but
        fed the given codes instead of drawn ones. Equal to self(codes, condition): the tests
        check it."""
        codes = tf.convert_to_tensor(codes, tf.int32)
        if condition is not None:
            condition = tf.convert_to_tensor(condition, tf.int32)

        def given(logits, r, c):
            return codes[:, r, c]

        return tf.function(lambda: self._raster(codes.shape[0], given, keep_logits=True,
                                                condition=condition)[1])()

    def _raster(self, count, pick, keep_logits=False, condition=None):
        """The prior over `count` maps in raster order, each position's work done once, after
        Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models".

        pick(logits (count, K) float32, r, c) -> the codes (count,) int32 at (r, c); condition:
        the condition maps (count, hc, wc) of a conditional prior. Returns (codes (count, h, w),
        logits (count, h, w, K) if keep_logits else None).

        Block i's vertical convolution at row r reads its input at rows r - k//2 .. r, its
        horizontal one at (r, c) the input at columns c - k//2 .. c (the type A block's input
        being the embedded codes one row, or one column, behind). So each block caches the last
        k//2 + 1 rows of its vertical input and the last k//2 + 1 columns of its horizontal
        input (MaskedConv2D.step): once a row is drawn, the vertical stack runs for the next
        row only (its links depend on rows above alone); at each position the horizontal stack
        and the head run at that one position. The layers' own weights and calls do the work, so
        the caches hold their compute dtype (bfloat16 under mixed_bfloat16), as the whole-map
        pass does; the logits are cast to float32 before pick.
        """
        size, width, dtype = self.grid_size, self.embed.output_dim, self.embed.compute_dtype
        depth = self.hparams["kernel_size"] // 2 + 1
        # a row keeps its row axis (B, 1, w, .), a position its column axis (B, 1, .): with
        # plain (B, F) tensors TF 2.21's grappler remapper fails on the last block's
        # MatMul + BiasAdd + Add before the head's ReLU, logs errors and optimizes nothing
        vertical = tuple(tf.zeros((count, depth, size, width), dtype) for _ in self.blocks)
        above = tf.zeros((count, 1, size, width), dtype)  # the embedded row r - 1: zeros at r = 0
        positions = self.position_map(condition)  # (1 or count, h, w, .): computed once
        rows = tf.TensorArray(tf.int32, size)
        seen = tf.TensorArray(tf.float32, size * size)  # written (and stored) if keep_logits
        for r in tf.range(size):
            vertical, links = self._next_row(vertical, above, positions[:, r][:, None])
            row, seen = self._draw_row(links, pick, r, seen, keep_logits)
            above = self.embed(row[:, None])
            rows = rows.write(r, row)
        codes = tf.transpose(rows.stack(), [1, 0, 2])
        if not keep_logits:
            return codes, None
        logits = tf.reshape(seen.stack(), (size, size, count, self.codebook_size))
        return codes, tf.transpose(logits, [2, 0, 1, 3])

    def _next_row(self, caches, above, position):
        """The vertical stack at row r from the blocks' caches (each (B, k//2 + 1, w, F)), the
        embedded row r - 1 (B, 1, w, F) and row r of the position map (1 or B, 1, w, .) ->
        (caches, links (B, 1, w, 2F) per block)."""
        v, updated, links = above, [], []
        for block, cache in zip(self.blocks, caches):
            cache, conv = block.vconv.step(cache, v)
            v, link = block.vertical_from(conv, position)
            updated.append(cache)
            links.append(link)
        return tuple(updated), links

    def _draw_row(self, links, pick, r, seen, keep_logits):
        """Row r, position by position, given its links (each (B, 1, w, 2F)) -> (its codes
        (B, w), seen with the row's logits (B, K) written at r * w + c if keep_logits)."""
        count, size, width = links[0].shape[0], self.grid_size, self.embed.output_dim
        caches = tuple(tf.zeros((count, self.hparams["kernel_size"] // 2 + 1, width),
                                self.embed.compute_dtype) for _ in self.blocks)
        left = tf.zeros((count, 1, width), self.embed.compute_dtype)  # embedded code (r, c - 1)
        row = tf.TensorArray(tf.int32, size)
        for c in tf.range(size):
            caches, logits = self._next_position(caches, left, [link[:, :, c] for link in links])
            logits = tf.cast(logits[:, 0], tf.float32)
            code = pick(logits, r, c)
            left = self.embed(code[:, None])
            row = row.write(c, code)
            if keep_logits:
                seen = seen.write(r * size + c, logits)
        return tf.transpose(row.stack()), seen

    def _next_position(self, caches, left, links):
        """The horizontal stack and head at (r, c) from the blocks' caches (each
        (B, k//2 + 1, F)), the embedded code at (r, c - 1) (B, 1, F) and the links at (r, c)
        (B, 1, 2F) -> (caches, logits (B, 1, K))."""
        h, updated = left, []
        for block, cache, link in zip(self.blocks, caches, links):
            cache, conv = block.hconv.step(cache, h)
            h = block.horizontal_from(conv, h, link, sampling=True)
            updated.append(cache)
        return tuple(updated), self._logits(h)

    def get_config(self):
        return {**super().get_config(), **self.hparams}
