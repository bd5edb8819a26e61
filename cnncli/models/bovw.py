"""`bovw`: bag of visual words, the pre-deep-learning pipeline the lectures set against learned features.

Dense local descriptors (HoG blocks: 2x2 cells of 9-bin gradient histograms, L2-Hys normalized,
one every `stride` pixels) -> a k-means codebook of `words` visual words (scikit-learn, fitted
once on the training images before training) -> each descriptor votes for its nearest word ->
histograms over a spatial pyramid (the whole image and its 2x2 quadrants, Lazebnik et al. 2006),
each L1-normalized, square-rooted (the Hellinger kernel, which a linear classifier then
approximates) and weighted 1/2 per level -> standardized with the training set's statistics ->
one linear layer: multinomial logistic regression with `train.loss: cross_entropy`, a linear SVM
with the hinge loss. Only the linear layer trains; the codebook and the statistics are fitted
values in the model's state, checkpointed with it, so `eval`, `predict` and `summary` work as for
any model.
"""


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli.errors import UserError
from cnncli.models.hog import BINS, BLOCK, SMALL_CELL, block_descriptors, cell_histograms, gradient_votes
from cnncli.models.layers import Dense, Layer, StackBuilder, global_windows
from cnncli.models.registry import DEFAULT_INPUTS, MNIST_INPUT, MODELS

WORDS = 256
STRIDE = 2  # a descriptor every 2 pixels: 11x11 = 121 overlapping 8x8-pixel descriptors on 28x28
PYRAMID = (1, 2)  # grid sizes of the pyramid levels: 1x1 and 2x2
FIT_IMAGES = 5000  # training images whose descriptors the codebook is fitted on
FIT_DESCRIPTORS = 60_000  # descriptors k-means sees (a random sample of those images' descriptors)
FIT_BATCH = 500  # images per jitted descriptor batch while fitting
KMEANS_BATCH = 4096
KMEANS_INITS = 3


class Fitted(nnx.Variable):
    """A value fitted to the training data before training (not a trained parameter)."""


class BagOfWords(Layer):
    """(N, H, W, C) -> (N, words * sum(g^2 for g in pyramid)) spatial-pyramid word histograms."""

    kind = "bovw"

    def __init__(self, input_hw: tuple[int, int], *, words: int = WORDS, cell: int = SMALL_CELL,
                 stride: int = STRIDE, bins: int = BINS, pyramid=PYRAMID):
        if cell % stride:
            raise UserError(f"bovw: the descriptor stride ({stride}) must divide the cell size ({cell})")
        self.words, self.cell, self.stride, self.bins, self.pyramid = words, cell, stride, bins, tuple(pyramid)
        self.grid = self._grid(input_hw)
        self.dim = BLOCK * BLOCK * bins
        self.codebook = Fitted(jnp.zeros((words, self.dim), jnp.float32))
        features = words * sum(g * g for g in self.pyramid)
        self.mean = Fitted(jnp.zeros((features,), jnp.float32))
        self.std = Fitted(jnp.ones((features,), jnp.float32))

    def _grid(self, hw):
        cells = [size // self.stride - self.cell // self.stride + 1 for size in hw]
        grid = tuple(c - (BLOCK - 1) * (self.cell // self.stride) for c in cells)
        if min(grid) < max(self.pyramid):
            raise UserError(f"a {hw[0]}x{hw[1]} image has too few {self.cell}-pixel descriptors for the pyramid "
                            f"{list(self.pyramid)}; use a smaller cell")
        return grid

    def output_shape(self, shape):
        if tuple(shape[1:3]) and self._grid(shape[1:3]) != self.grid:
            raise UserError(f"was fitted for another image size, got {shape[1]}x{shape[2]}")
        return (shape[0], self.mean[...].shape[0])

    def descriptors(self, x: jax.Array) -> jax.Array:
        """Dense HoG-block descriptors (N, gh * gw, dim)."""
        hist = cell_histograms(gradient_votes(x, self.bins), self.cell, self.stride)
        d = block_descriptors(hist, self.cell // self.stride)
        return d.reshape(x.shape[0], -1, self.dim)

    def histograms(self, x: jax.Array) -> jax.Array:
        """The pyramid's normalized histograms, before standardization: (N, features)."""
        d = self.descriptors(x)
        c = self.codebook[...]
        distance = jnp.sum(c * c, -1) - 2.0 * d @ c.T  # |d|^2 is the same for every word
        votes = jax.nn.one_hot(jnp.argmin(distance, -1), self.words, dtype=x.dtype)  # (N, P, words)
        regions = jnp.asarray(pyramid_regions(self.grid, self.pyramid), x.dtype)
        hist = jnp.einsum("npk,rp->nrk", votes, regions)  # (N, regions, words), each row sums to 1
        levels = np.repeat(np.arange(len(self.pyramid)), [g * g for g in self.pyramid])
        weight = jnp.asarray(1.0 / len(self.pyramid) * np.ones(len(levels)), x.dtype)
        return (jnp.sqrt(hist) * weight[None, :, None]).reshape(x.shape[0], -1)

    def forward(self, x):
        return (self.histograms(x) - self.mean[...]) / self.std[...]

    def fit(self, x: np.ndarray, seed: int) -> str:
        """Fit the codebook (k-means) and the standardization on layer inputs `x`; returns a one-line report."""
        from sklearn.cluster import MiniBatchKMeans

        rng = np.random.default_rng(seed)
        x = x[rng.permutation(len(x))[:FIT_IMAGES]]
        describe = jax.jit(self.descriptors)
        d = np.concatenate([np.asarray(describe(jnp.asarray(x[i:i + FIT_BATCH])))
                            for i in range(0, len(x), FIT_BATCH)]).reshape(-1, self.dim)
        sample = d[rng.choice(len(d), min(FIT_DESCRIPTORS, len(d)), replace=False)]
        if len(sample) < self.words:
            raise UserError(f"bovw: {len(sample)} descriptors cannot make {self.words} words; lower model.args.words")
        kmeans = MiniBatchKMeans(self.words, batch_size=KMEANS_BATCH, n_init=KMEANS_INITS, random_state=seed)
        kmeans.fit(sample)
        self.codebook[...] = jnp.asarray(kmeans.cluster_centers_, jnp.float32)
        hist = jax.jit(self.histograms)
        h = np.concatenate([np.asarray(hist(jnp.asarray(x[i:i + FIT_BATCH]))) for i in range(0, len(x), FIT_BATCH)])
        self.mean[...] = jnp.asarray(h.mean(0), jnp.float32)
        self.std[...] = jnp.asarray(np.maximum(h.std(0), 1e-3), jnp.float32)  # a word never seen stays 0
        return (f"bovw: k-means codebook of {self.words} words fitted on {len(sample):,} descriptors of "
                f"{len(x):,} training images")

    def macs(self, in_shapes, out_shape):
        return self.grid[0] * self.grid[1] * self.words * self.dim  # the distances to the words

    def windows(self, in_shape):
        return global_windows(in_shape)

    def describe(self):
        levels = "+".join(f"{g}x{g}" for g in self.pyramid)
        return (f"bag of words: {self.words} k-means words of {self.dim}-d HoG blocks every {self.stride} px, "
                f"pyramid {levels} (fitted, not trained)")


def pyramid_regions(grid: tuple[int, int], pyramid) -> np.ndarray:
    """(regions, positions): each pyramid cell's share of each descriptor position (rows sum to 1)."""
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    regions = []
    for g in pyramid:
        r, c = rows * g // gh, cols * g // gw
        for i in range(g):
            for j in range(g):
                mask = ((r == i) & (c == j)).reshape(-1).astype(np.float32)
                regions.append(mask / mask.sum())
    return np.stack(regions)


@MODELS.register("bovw", help="bag of visual words: dense HoG descriptors, k-means codebook (fitted), spatial "
                              "pyramid histograms, linear classifier")
def bovw(*, input_shape, num_classes, rngs, words=WORDS, cell=SMALL_CELL, stride=STRIDE, pyramid=PYRAMID):
    b = StackBuilder(input_shape)
    b.add("bovw", BagOfWords(tuple(input_shape[:2]), words=int(words), cell=int(cell), stride=int(stride),
                             pyramid=tuple(pyramid)))
    b.add("fc", Dense(b.features, num_classes, rngs=rngs))
    return b.build()


DEFAULT_INPUTS["bovw"] = MNIST_INPUT
