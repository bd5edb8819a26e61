"""Tests of the augmentation catalogue: every op's contract, geometric references, mixing labels, errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnncli.data.augment import AUGMENTATIONS, affine_matrices, build_augment, op_parameters, preview_draws, warp_affine
from cnncli.errors import UserError

N, H, W = 4, 16, 16

# Parameters at which each op must be the identity ("magnitude 0").
ZERO_PARAMS = {
    "crop": {"pad": 0}, "random_crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "crop_and_pad": {"percent": 0.0},
    "translate": {"x": 0.0, "y": 0.0}, "rotate": {"degrees": 0.0}, "scale": {"amount": 0.0},
    "shear": {"degrees": 0.0, "axis": "both"}, "affine": {"degrees": 0, "scale": 0, "shear": 0, "translate": 0},
    "perspective": {"distortion": 0.0}, "elastic": {"alpha": 0.0},
    "brightness": {"amount": 0.0}, "contrast": {"amount": 0.0}, "saturation": {"amount": 0.0}, "hue": {"amount": 0.0},
    "gamma": {"amount": 0.0}, "sharpen": {"amount": 0.0}, "emboss": {"amount": 0.0}, "grayscale": {"amount": 0.0},
    "gaussian_noise": {"std": 0.0}, "gaussian_blur": {"sigma": 0.0}, "salt_pepper": {"amount": 0.0},
    "coarse_dropout": {"size": 0.0}, "cutout": {"size": 0}, "random_erasing": {"scale": [0.0, 0.0]},
    "fog": {"amount": 0.0}, "snow": {"amount": 0.0}, "clouds": {"amount": 0.0}, "superpixels": {"replace": 0.0},
    "mixup": {"alpha": 0.0}, "cutmix": {"alpha": 0.0},
    "randaugment": {"magnitude": 0.0}, "trivialaugment": {"magnitude": 0.0},
}
# Ops without a magnitude: deterministic given p = 1.
NO_MAGNITUDE = {"hflip", "vflip", "invert"}
DETERMINISTIC = NO_MAGNITUDE | {"grayscale"}
# Ops that are the identity on grey images.
COLOUR_ONLY = {"hue", "saturation", "grayscale"}
MIXING = {"mixup", "cutmix"}


_COMPILED = {}


def _jit(name, params=None):
    """One jitted function per (op, params), shared across tests so each shape compiles once."""
    params = params or {}
    key = (name, json.dumps(params, sort_keys=True))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(build_augment([{"name": name, **params}]))
    return _COMPILED[key]


def _batch(c, n=N, h=H, w=W, seed=0):
    x = jax.random.uniform(jax.random.key(seed), (n, h, w, c), jnp.float32)
    y = jax.nn.one_hot(jnp.arange(n) % 4, 4)
    return x, y


def test_catalogue_is_complete_and_covered():
    expected = {"hflip", "vflip", "crop", "crop_and_pad", "random_crop", "translate", "rotate", "scale", "shear",
                "affine", "perspective", "elastic", "brightness", "contrast", "saturation", "hue", "gamma", "invert",
                "sharpen", "emboss", "grayscale", "gaussian_noise", "gaussian_blur", "salt_pepper", "coarse_dropout",
                "cutout", "random_erasing", "fog", "clouds", "snow", "superpixels", "mixup", "cutmix", "randaugment",
                "trivialaugment"}
    assert expected <= set(AUGMENTATIONS.names())
    # Every op must declare how to make it the identity (or have no magnitude), so the tests below cover it.
    assert set(AUGMENTATIONS.names()) == set(ZERO_PARAMS) | NO_MAGNITUDE
    for name in AUGMENTATIONS.names():
        assert AUGMENTATIONS.help(name), name
        assert set(ZERO_PARAMS.get(name, {})) <= set(op_parameters(name)), name


@pytest.mark.parametrize("name", sorted(set(ZERO_PARAMS) | NO_MAGNITUDE))
def test_op_contract(name):
    """Shape, dtype, range, determinism, randomness, jit on RGB and grey, identity at p=0 and magnitude 0."""
    x3, y = _batch(3)
    x1 = x3[..., :1]
    fn = build_augment([{"name": name}])
    zero = build_augment([{"name": name, **ZERO_PARAMS.get(name, {})}])

    # One jit for all variants: XLA shares the PRNG work, compiling about twice as fast as three jits.
    @jax.jit
    def run(k):
        return fn(x3, y, k), fn(x1, y, k), zero(x3, y, k)

    outs_a = jax.tree.map(np.asarray, run(jax.random.key(1)))
    outs_again = jax.tree.map(np.asarray, run(jax.random.key(1)))
    outs_b = jax.tree.map(np.asarray, run(jax.random.key(2)))
    for (img, lab), x in zip(outs_a[:2], (x3, x1), strict=True):
        assert img.shape == x.shape and img.dtype == np.float32
        assert lab.shape == y.shape and lab.dtype == np.float32
        assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
        np.testing.assert_allclose(lab.sum(1), 1.0, atol=1e-5)
        if name not in MIXING:
            np.testing.assert_array_equal(lab, y)
    jax.tree.map(np.testing.assert_array_equal, outs_a, outs_again)
    for i, x in enumerate((x3, x1)):
        grey_noop = i == 1 and name in COLOUR_ONLY
        changed = not np.allclose(outs_a[i][0], np.asarray(x), atol=1e-4)
        assert changed != grey_noop, f"{name}: default parameters should change RGB images and leave grey ones"
        if name not in DETERMINISTIC and not grey_noop:
            assert not np.array_equal(outs_a[i][0], outs_b[i][0]), f"{name}: same output for different keys"
    if name in ZERO_PARAMS:
        np.testing.assert_allclose(outs_a[2][0], np.asarray(x3), atol=2e-6)
        np.testing.assert_array_equal(outs_a[2][1], np.asarray(y))
    # p = 0 skips the op entirely.
    off = build_augment([{"name": name, "p": 0.0}])
    img, lab = off(x3, y, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(x3))
    np.testing.assert_array_equal(np.asarray(lab), np.asarray(y))


def test_superpixels_paint_segments_with_their_mean():
    from cnncli.data.augment.pixel import slic

    # two flat halves with a little noise: SLIC should not mix them, and painting keeps each segment's sum
    x = np.zeros((2, 16, 16, 1), np.float32)
    x[:, :, 8:] = 0.8
    x += 0.05 * np.random.default_rng(0).random(x.shape, dtype=np.float32)
    segment, means = slic(jnp.asarray(x), 16)
    seg = np.asarray(segment).reshape(2, 16, 16)
    for i in range(2):
        left, right = set(seg[i, :, :8].ravel()), set(seg[i, :, 8:].ravel())
        assert not left & right, "a segment straddles the edge between the halves"
        for s in np.unique(seg[i]):
            np.testing.assert_allclose(np.asarray(means)[i, s, 0], x[i][seg[i] == s].mean(), rtol=1e-5)
    out, _ = _jit("superpixels", {"segments": 16, "replace": 1.0})(jnp.asarray(x), jnp.ones((2, 1)), jax.random.key(0))
    out = np.asarray(out)
    assert len(np.unique(out[0])) <= 16 < len(np.unique(x[0]))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=1e-5)  # means keep the sums


def test_clouds_brighten_a_dark_image():
    x, y = _batch(1, seed=4)
    x = 0.5 * x
    out, _ = _jit("clouds", {"amount": 1.0})(x, y, jax.random.key(5))
    out = np.asarray(out)
    assert (out >= np.asarray(x) - 1e-6).all() and out.mean() > float(x.mean()) + 0.05


# ---- geometric references ------------------------------------------------------------------

def _checkerboard(h=H, w=W, c=1, cell=2):
    yy, xx = np.mgrid[:h, :w]
    board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    # Distinct values per pixel on top of the board, so a shift cannot match by symmetry.
    board = 0.5 * board + 0.5 * (yy * w + xx) / (h * w)
    return np.repeat(board[None, :, :, None], c, axis=-1)


def _shifted(img, dy, dx):
    """np.roll by (dy, dx) with the vacated border zeroed."""
    out = np.roll(img, (dy, dx), axis=(1, 2))
    h, w = img.shape[1:3]
    if dy > 0:
        out[:, :dy] = 0
    elif dy < 0:
        out[:, h + dy:] = 0
    if dx > 0:
        out[:, :, :dx] = 0
    elif dx < 0:
        out[:, :, w + dx:] = 0
    return out


def test_flips_match_numpy():
    x, y = _batch(3)
    for name, axis in (("hflip", 2), ("vflip", 1)):
        out, _ = build_augment([{"name": name}])(x, y, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out), np.flip(np.asarray(x), axis=axis))


@pytest.mark.parametrize("dy,dx", [(3, 2), (-2, 5)])
def test_translation_matches_roll(dy, dx):
    img = _checkerboard()
    m = affine_matrices(H, W, 1, tx=dx, ty=dy)
    out = np.asarray(warp_affine(jnp.asarray(img), m))
    np.testing.assert_allclose(out, _shifted(img, dy, dx), atol=1e-6)


def test_rotation_by_90_matches_rot90():
    img = np.asarray(_batch(3, n=1)[0])
    out = np.asarray(warp_affine(jnp.asarray(img), affine_matrices(H, W, 1, angle=90.0)))
    np.testing.assert_allclose(out, np.rot90(img, 1, axes=(1, 2)), atol=1e-5)
    out = np.asarray(warp_affine(jnp.asarray(img), affine_matrices(H, W, 1, angle=-90.0)))
    np.testing.assert_allclose(out, np.rot90(img, -1, axes=(1, 2)), atol=1e-5)


def test_crop_is_whole_pixel_shift():
    img = np.repeat(_checkerboard(c=3), N, axis=0)
    y = _batch(3)[1]
    pad = op_parameters("crop")["pad"]
    for mode, np_mode in (("zeros", "constant"), ("reflect", "reflect"), ("edge", "edge")):
        out, _ = _jit("crop", {"mode": mode} if mode != "zeros" else None)(jnp.asarray(img), y, jax.random.key(5))
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
        for i in range(N):
            windows = [padded[i, oy:oy + H, ox:ox + W] for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)]
            assert any(np.array_equal(np.asarray(out[i]), win) for win in windows), (mode, i)
    out, _ = _jit("crop", {"pad": 0})(jnp.asarray(img), y, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(out), img)


# ---- mixing --------------------------------------------------------------------------------

def _mix_batch(n=N, c=1):
    # Constant images with distinct values, one class each: every pixel names its source image.
    values = (np.arange(n, dtype=np.float32) + 1.0) / (n + 1.0)
    x = np.broadcast_to(values[:, None, None, None], (n, H, W, c)).copy()
    return jnp.asarray(x), jnp.eye(n, dtype=jnp.float32), values


def test_mixing_labels_are_the_mixing_weights_and_pasted_area():
    x, y, values = _mix_batch()
    mixup, cutmix = build_augment([{"name": "mixup", "alpha": 1.0}]), build_augment([{"name": "cutmix"}])
    run = jax.jit(lambda k: (mixup(x, y, k), cutmix(x, y, k)))
    mixed = pasted = 0
    for seed in range(6):
        (out, lab), (cut, cut_lab) = jax.tree.map(np.asarray, run(jax.random.key(seed)))
        for labels in (lab, cut_lab):
            np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
            assert (labels >= 0).all() and ((labels > 0).sum(1) <= 2).all()
        # Mixup: each image is exactly the label-weighted mix of the source images.
        np.testing.assert_allclose(out[:, 0, 0, 0], lab @ values, atol=1e-6)
        mixed += int(((lab > 1e-3) & (lab < 1 - 1e-3)).any(1).sum())
        # CutMix: the label weight of each source is the fraction of pixels actually taken from it.
        for i in range(len(values)):
            source = np.argmin(np.abs(cut[i, ..., 0][..., None] - values), axis=-1)
            fractions = np.bincount(source.ravel(), minlength=len(values)) / (H * W)
            np.testing.assert_allclose(cut_lab[i], fractions, atol=1e-6)
            pasted += int(fractions[i] < 1.0)
    assert mixed > 0 and pasted > 0


# ---- build_augment -------------------------------------------------------------------------

def test_build_augment_errors():
    assert build_augment([]) is None
    with pytest.raises(UserError, match=r"augment\[0\].*unknown augmentation 'rotat'.*did you mean: rotate"):
        build_augment([{"name": "rotat"}])
    with pytest.raises(UserError) as err:
        build_augment([{"name": "hflip", "p": 0.5}, {"name": "crop"}, {"name": "rotate", "degree": 10}])
    assert str(err.value) == ("augment[2] (rotate): unknown parameter 'degree' (did you mean: degrees?); "
                              "parameters: degrees")
    with pytest.raises(UserError, match=r"augment\[0\] \(rotate\): degrees must be in \[0, 180\]; got 500"):
        build_augment([{"name": "rotate", "degrees": 500}])
    with pytest.raises(UserError, match=r"p must be a probability"):
        build_augment([{"name": "rotate", "p": 1.5}])
    with pytest.raises(UserError, match=r"mode must be one of: zeros, reflect, edge"):
        build_augment([{"name": "crop", "mode": "wrap"}])
    with pytest.raises(UserError, match=r"scale must be a range"):
        build_augment([{"name": "random_crop", "scale": [0.5]}])
    with pytest.raises(UserError, match=r"pad must be a whole number"):
        build_augment([{"name": "crop", "pad": 2.5}])
    with pytest.raises(UserError, match=r"holes must be a number"):
        build_augment([{"name": "coarse_dropout", "holes": "many"}])


def test_build_augment_accepts_recipe_ops_in_order():
    from cnncli.recipe import AugmentOp

    ops = [AugmentOp(name="invert"), AugmentOp(name="brightness", p=1.0, amount=0.0), AugmentOp(name="hflip")]
    x, y = _batch(1)
    out, lab = jax.jit(build_augment(ops))(x, y, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out), np.flip(1.0 - np.asarray(x), axis=2), atol=1e-6)
    # Order matters: crop then invert fills the border with 1, invert then crop with 0.
    first = jax.jit(build_augment([AugmentOp(name="crop", pad=4), AugmentOp(name="invert")]))
    out, _ = first(jnp.full((64, 8, 8, 1), 0.25), y[:1].repeat(64, 0), jax.random.key(1))
    assert np.asarray(out).max() == 1.0


def test_probability_is_per_image():
    n = 256
    x = jax.random.uniform(jax.random.key(0), (n, 4, 4, 1))
    y = jnp.ones((n, 1))
    fn = jax.jit(build_augment([{"name": "invert", "p": 0.5}]))
    fractions = []
    for seed in range(3):
        key = jax.random.key(seed)
        # Inside the training step nothing may cross between host and device.
        with jax.transfer_guard("disallow"):
            out, _ = fn(x, y, key)
        changed = np.abs(np.asarray(out) - np.asarray(x)).max(axis=(1, 2, 3)) > 1e-6
        fractions.append(changed.mean())
    assert all(0.4 < f < 0.6 for f in fractions), fractions
    assert len(set(fractions)) > 1


def test_policies_pick_ops_per_image():
    x, y = _batch(3, n=64, h=8, w=8)
    fn = jax.jit(build_augment([{"name": "randaugment", "num_ops": 1, "magnitude": 15}]))
    out, _ = fn(x, y, jax.random.key(0))
    diff = np.abs(np.asarray(out) - np.asarray(x)).max(axis=(1, 2, 3))
    # 1 of the 13 candidates is the identity: some images unchanged, most changed.
    assert 0 < (diff < 1e-6).sum() < 16 and (diff > 1e-3).sum() > 40


def test_preview_draws_say_which_ops_fired():
    x = (np.asarray(_batch(3, n=16)[0]) * 255).astype(np.uint8)
    fn = build_augment([{"name": "invert", "p": 0.5}, {"name": "vflip", "p": 0.0}, {"name": "hflip"}])
    images, fired = preview_draws(x, fn, jax.random.key(0), draws=3)
    assert images.shape == (3, *x.shape) and images.dtype == np.uint8 and fired.shape == (3, 16, 3)
    assert not fired[..., 1].any() and fired[..., 2].all()  # p = 0 never fires, p = 1 always
    assert 0 < fired[..., 0].sum() < 48
    for d in range(3):
        for i in range(16):  # what fired is what happened: hflip always, invert where it says so
            expected = x[i, :, ::-1]
            np.testing.assert_array_equal(images[d, i], 255 - expected if fired[d, i, 0] else expected)


SHARDED_CHECK = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cnncli.data.augment import build_augment
    assert jax.device_count() == 4
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    x = np.random.default_rng(0).random((8, 8, 8, 3), dtype=np.float32)
    y = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    fn = jax.jit(build_augment([{"name": "crop", "pad": 2, "p": 0.5}, {"name": "cutmix"}]))
    a = fn(x, y, jax.random.key(1))
    b = fn(jax.device_put(x, sharding), jax.device_put(y, sharding), jax.random.key(1))
    assert b[0].sharding.spec == P("data"), b[0].sharding
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6)
    print("ok")
""")


@pytest.mark.slow
def test_sharded_batch_gives_the_same_result():
    """On a 4-device data mesh the ops (mixing across shards included) give the one-device result."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
