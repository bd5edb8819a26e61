"""Fashion-MNIST from local IDX files (Debian's package, a directory, or $CNNCLI_FASHION_MNIST) or TFDS."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from cnncli.data.sources import tfds
from cnncli.data.sources.base import Source, register
from cnncli.data.sources.idx import has_idx, read_idx_dir
from cnncli.errors import UserError

FASHION_MNIST_ENV = "CNNCLI_FASHION_MNIST"
# Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files here.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_HOWTO = ("`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
                       "`cnncli data prepare tfds:fashion_mnist`, or pass the directory of the IDX files "
                       f"as fashion_mnist:DIR or in ${FASHION_MNIST_ENV}")


def _fashion_mnist_dirs() -> list[tuple[Path, bool]]:
    """Candidate directories in order, each with whether the user named it (then it must work)."""
    env = os.environ.get(FASHION_MNIST_ENV)
    dirs = [(Path(env).expanduser(), True)] if env else []
    return dirs + [(FASHION_MNIST_SYSTEM_DIR, False)]


@register
class FashionMnistSource(Source):
    """Fashion-MNIST (70,000 28x28 gray clothes images, 10 classes) from local IDX files or TFDS."""

    scheme, arg = "fashion_mnist", "optional"

    def read(self, arg, *, image_size, channels):
        if arg:
            return read_idx_dir(Path(arg).expanduser(), "fashion_mnist", FASHION_MNIST_CLASSES)
        for directory, named in _fashion_mnist_dirs():
            if named or has_idx(directory):
                if named and not directory.is_dir():
                    raise UserError(f"${FASHION_MNIST_ENV} names {directory}, which does not exist; "
                                    f"point it at the directory of the Fashion-MNIST IDX files")
                return read_idx_dir(directory, "fashion_mnist", FASHION_MNIST_CLASSES)
        if tfds.is_prepared("fashion_mnist"):
            return replace(tfds.load_tfds("fashion_mnist"), name="fashion_mnist",
                           class_names=list(FASHION_MNIST_CLASSES))
        raise UserError(f"Fashion-MNIST not found (looked in {FASHION_MNIST_SYSTEM_DIR} and "
                        f"{tfds.tfds_data_dir()}); get it with {FASHION_MNIST_HOWTO}")

    def status(self):
        for directory, named in _fashion_mnist_dirs():
            if has_idx(directory):
                return True, f"IDX files in {directory}"
            if named:
                return False, f"${FASHION_MNIST_ENV}={directory} holds no IDX files"
        if tfds.is_prepared("fashion_mnist"):
            return True, f"TFDS, prepared in {tfds.tfds_data_dir()}"
        return False, f"get it with {FASHION_MNIST_HOWTO}"


