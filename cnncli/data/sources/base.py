"""What every dataset source is: a `Source` registered in `SOURCES` under its scheme."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cnncli.data.dataset import Dataset
from cnncli.data.images import resize_images, to_channels
from cnncli.data.records import RecordData
from cnncli.errors import UserError
from cnncli.registry import Registry


def _check_options(image_size: tuple[int, int] | None, channels: int | None) -> None:
    if channels is not None and channels not in (1, 3):
        raise UserError(f"data.channels is {channels}; use 1 (gray) or 3 (RGB)")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise UserError(f"data.image_size is {list(image_size)}; give two positive integers [H, W]")


def adapt(ds: Dataset, image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Return `ds` with every split converted to `channels` and resized to `image_size` (None keeps them)."""

    def conv(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        # Resize while the images have the fewer channels: Pillow's work grows with the channel count.
        gray_first = channels == 1
        if gray_first:
            x = to_channels(x, channels)
        if image_size is not None:
            x = resize_images(x, tuple(image_size))
        if channels is not None and not gray_first:
            x = to_channels(x, channels)
        return x

    if channels is None and image_size is None:
        return ds
    return replace(ds, train_x=conv(ds.train_x), test_x=conv(ds.test_x))


class Source:
    """A dataset source registered under its scheme.

    Subclasses implement `read` (the data in its natural shape) and `status`; `load` applies the
    user's channel and size options uniformly.
    """

    scheme: str = ""
    #: "required", "optional" or "none": whether `scheme:arg` takes an argument.
    arg: str = "none"
    #: Shown in error messages when the argument is missing, e.g. "folder:PATH".
    usage: str = ""

    def load(self, arg: str | None = None, *, image_size: tuple[int, int] | None = None,
             channels: int | None = None) -> Dataset:
        """Load the dataset named by `arg` with every split converted to `channels` and `image_size`.

        Raises:
            UserError: The data is missing, unreadable or malformed, or the options are invalid.
        """
        _check_options(image_size, channels)
        self.check_arg(arg)
        return adapt(self.read(arg, image_size=image_size, channels=channels), image_size, channels)

    def check_arg(self, arg: str | None) -> None:
        """Raise a UserError when `arg` is missing but required, or given but not taken."""
        if self.arg == "required" and not arg:
            raise UserError(f"dataset '{self.scheme}' needs an argument: {self.usage}")
        if self.arg == "none" and arg:
            raise UserError(f"dataset '{self.scheme}' takes no argument (got '{self.scheme}:{arg}'); "
                            f"use just '{self.scheme}'")

    def read(self, arg: str | None, *, image_size: tuple[int, int] | None, channels: int | None) -> Dataset:
        """Return the data; may already apply `image_size`/`channels` where that is cheaper (folders)."""
        raise NotImplementedError

    def status(self) -> tuple[bool, str]:
        """(available here, one line: where it comes from or how to get it)."""
        raise NotImplementedError

    def records(self, arg: str | None) -> RecordData | None:
        """The dataset as records read one at a time (data.pipeline=stream), or None when this source
        only loads whole (its data is small, or comes as arrays)."""
        return None


SOURCES = Registry("dataset")


def register(cls: type[Source]) -> type[Source]:
    SOURCES.register(cls.scheme, cls(), help=(cls.__doc__ or "").strip().splitlines()[0])
    return cls


