"""NumPy archives: npz:PATH with arrays x, y (+ x_test, y_test, class_names); pickles are refused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, Dataset
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError


def _npz_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{where} has shape {x.shape}; images must be (N, H, W) or (N, H, W, C) with C 1 or 3")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise UserError(f"{where} is float with values outside [0, 1] (min {np.nanmin(x):g}, max "
                            f"{np.nanmax(x):g}); save uint8 0..255 or floats scaled to [0, 1]")
        return np.rint(x * 255.0).astype(np.uint8)
    if x.dtype.kind in "iu" and (not x.size or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise UserError(f"{where} has dtype {x.dtype}; save images as uint8 0..255 or float in [0, 1]")


def _npz_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise UserError(f"{where} has dtype {y.dtype}; labels must be integers 0..K-1")
    if y.shape != (n,):
        raise UserError(f"{where} has shape {y.shape}; expected ({n},), one label per image")
    if n and y.min() < 0:
        raise UserError(f"{where} has negative labels; labels must be integers 0..K-1")
    return y.astype(np.int32)


@register
class NpzSource(Source):
    """NumPy archive with arrays x, y (+ optional x_test, y_test, class_names): npz:PATH."""

    scheme, arg, usage = "npz", "required", "npz:PATH (a .npz with arrays x and y)"

    def read(self, arg, *, image_size, channels):
        path = Path(arg).expanduser()
        if not path.is_file():
            raise UserError(f"npz: no such file {path}")
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"npz: cannot read {path} as a NumPy .npz archive ({e}); save it with np.savez") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise UserError(f"npz: {path} holds a single array, not an archive; save it with np.savez(path, x=..., "
                            f"y=...)")
        with z:
            for key in ("x", "y"):
                if key not in z:
                    raise UserError(f"npz: {path} has no array '{key}' (found: {', '.join(z.files) or 'none'}); "
                                    f"save images as x and labels as y")
            if ("x_test" in z) != ("y_test" in z):
                raise UserError(f"npz: {path} has only one of x_test and y_test; save both or neither")
            try:
                arrays = {k: z[k] for k in z.files}
            except ValueError as e:  # object arrays need pickle, which we refuse for safety
                raise UserError(f"npz: cannot read {path}: {e}; save class_names as np.array(names, dtype=str)") \
                    from None
        where = f"npz:{path}"
        train_x = _npz_images(arrays["x"], f"{where} array x")
        train_y = _npz_labels(arrays["y"], len(train_x), f"{where} array y")
        test_x = test_y = None
        if "x_test" in arrays:
            test_x = _npz_images(arrays["x_test"], f"{where} array x_test")
            test_y = _npz_labels(arrays["y_test"], len(test_x), f"{where} array y_test")
            if test_x.shape[1:] != train_x.shape[1:]:
                raise UserError(f"{where}: x_test images are {test_x.shape[1:]} but x images are {train_x.shape[1:]}; "
                                f"both splits need the same image shape")
        top = max(int(y.max()) for y in (train_y, test_y) if y is not None and len(y)) if len(train_y) else -1
        if "class_names" in arrays:
            names = [str(c) for c in np.asarray(arrays["class_names"]).reshape(-1)]
            if top >= len(names):
                raise UserError(f"{where}: labels go up to {top} but class_names has only {len(names)} names")
        else:
            names = [str(i) for i in range(top + 1)]
        if len(names) < MIN_CLASSES:
            raise UserError(f"{where} has {len(names)} class; a classifier needs at least {MIN_CLASSES}")
        return Dataset(path.stem, train_x, train_y, test_x, test_y, names)

    def status(self):
        return True, "npz:PATH reads arrays x, y (+ x_test, y_test, class_names) from a .npz file"


