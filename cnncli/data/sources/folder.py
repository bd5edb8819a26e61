"""Image folders: folder:PATH with one sub-folder per class, optionally under train/ and test/ (or val/).

Hand-written on Pillow and a NumPy cache, so reading a folder needs neither TensorFlow nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, Dataset, cache_dir, cache_key, load_cached, save_cached
from cnncli.data.images import decode_image, resize_image, to_channels
from cnncli.data.records import FileRecords, RecordData
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
# The held-out split beside train/: test/, else val/ (ImageNet's layout, whose test labels are not public).
TEST_FOLDERS = ("test", "val")


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not _is_hidden(d)), key=lambda d: d.name)


def _image_files(class_dir: Path) -> list[Path]:
    # rglob: nested folders inside a class folder still belong to that class, except hidden ones
    # (.ipynb_checkpoints/, .thumbnails/ hold copies and thumbnails, not training images)
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _decode_all(files: list[tuple[Path, int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode (file, label) pairs; returns the images (natural channels) and int32 labels."""
    return [decode_image(f) for f, _ in files], np.array([label for _, label in files], np.int32)


def _stack(images: list[np.ndarray], files: list[Path], image_size, channels: int, root: Path) -> np.ndarray:
    out = []
    first_shape = None
    for img, f in zip(images, files, strict=True):
        img = to_channels(img[None], channels)[0]
        if image_size is not None:
            img = resize_image(img, tuple(image_size))
        elif first_shape is None:
            first_shape = (img.shape, f)
        elif img.shape != first_shape[0]:
            (h0, w0, _), f0 = first_shape
            raise UserError(f"images in {root} have different sizes ({f0.name} is {h0}x{w0}, {f.name} is "
                            f"{img.shape[0]}x{img.shape[1]}); set data.image_size in the recipe, e.g. "
                            f"`image_size: [64, 64]` under `data:`")
        out.append(img)
    if not out:
        h, w = image_size or (1, 1)
        return np.zeros((0, h, w, channels), np.uint8)
    return np.stack(out)


def _folder_listing(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    listing = []
    for f in files:
        st = f.stat()
        listing.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return listing


@dataclass(frozen=True)
class FolderListing:
    """The image files of a folder dataset, per split, with their labels (nothing decoded)."""

    root: Path
    roots: dict[str, Path]  # split -> folder of class sub-folders
    class_names: list[str]
    files: dict[str, list[tuple[Path, int]]]  # split -> (file, label)


def list_folder(path: Path) -> FolderListing:
    """The files of `path/train/<class>/*` (+ `path/test/<class>/*`, or ImageNet's `path/val/<class>/*`) or
    `path/<class>/*` (all train).

    Raises:
        UserError: Missing folder, fewer than 2 classes, a test class unknown to train, an empty class.
    """
    if not path.is_dir():
        raise UserError(f"folder: no such directory {path}; give a folder with one sub-folder of images per class")
    root = path.resolve()
    train_root, test_root = root, None
    if (root / "train").is_dir():
        train_root = root / "train"
        test_root = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    class_names = [d.name for d in _class_dirs(train_root)]
    if not class_names:  # one class is enough to evaluate a trained model on; training checks for two
        raise UserError(f"found no class folder in {train_root}: give a folder with one sub-folder of images per "
                        f"class (training needs at least {MIN_CLASSES})")
    if test_root is not None:
        unknown = [d.name for d in _class_dirs(test_root) if d.name not in class_names]
        if unknown:
            raise UserError(f"{test_root} has class folder(s) {', '.join(unknown)} that {train_root} lacks; "
                            f"every test class needs training images")

    splits = {"train": train_root} | ({"test": test_root} if test_root else {})
    files = {s: [(f, label) for label, name in enumerate(class_names) if (r / name).is_dir()
                 for f in _image_files(r / name)] for s, r in splits.items()}
    train_labels = {label for _, label in files["train"]}
    for label, name in enumerate(class_names):
        if label not in train_labels:
            raise UserError(f"class folder {train_root / name} has no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder")
    return FolderListing(root, splits, class_names, files)


def read_folder(path: Path, image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Decode every image of the folder dataset at `path` (see `list_folder`) into memory.

    Decoded arrays are cached under `cache_dir()`, keyed by the folder, the options and the
    (name, size, mtime) of every file, so editing the folder invalidates the cache.

    Raises:
        UserError: What `list_folder` raises, an unreadable image, or mixed image sizes without `image_size`.
    """
    listing = list_folder(path)
    root, files, splits, class_names = listing.root, listing.files, listing.roots, listing.class_names
    key = cache_key("folder", str(root), image_size and list(image_size), channels,
                    {s: _folder_listing([f for f, _ in fs], root) for s, fs in files.items()})
    cache = cache_dir() / f"folder-{root.name}-{key}.npz"
    cached = load_cached(cache, root.name)
    if cached is not None:
        return cached

    decoded = {s: _decode_all(fs) for s, fs in files.items()}
    if channels is None:
        all_gray = all(img.shape[-1] == 1 for imgs, _ in decoded.values() for img in imgs)
        channels = 1 if all_gray else 3
    arrays = {s: (_stack(imgs, [f for f, _ in files[s]], image_size, channels, splits[s]), y)
              for s, (imgs, y) in decoded.items()}
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays.get("test", (None, None))
    test_root = splits.get("test")
    if test_x is not None and len(test_x) and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"test images in {test_root} are {test_x.shape[1]}x{test_x.shape[2]} but train images are "
                        f"{train_x.shape[1]}x{train_x.shape[2]}; set data.image_size in the recipe")
    if test_x is not None and not len(test_x):
        test_x = test_y = None
    ds = Dataset(root.name, train_x, train_y, test_x, test_y, class_names)
    save_cached(cache, ds)
    return ds


def folder_records(path: Path) -> RecordData:
    """The folder dataset at `path` as files read one at a time (data.pipeline=stream); nothing is decoded."""
    listing = list_folder(path)
    splits = {s: FileRecords(listing.root, [f.relative_to(listing.root).as_posix() for f, _ in fs],
                             np.array([label for _, label in fs], np.int32))
              for s, fs in listing.files.items() if fs}
    return RecordData(listing.root.name, splits, listing.class_names, None)


@register
class FolderSource(Source):
    """Image files, one sub-folder per class (optionally under train/ and test/ or val/): folder:PATH."""

    scheme, arg, usage = "folder", "required", "folder:PATH (PATH/<class>/*.png or PATH/train/<class>/...)"

    def read(self, arg, *, image_size, channels):
        return read_folder(Path(arg).expanduser(), image_size, channels)

    def records(self, arg):
        return folder_records(Path(arg).expanduser())

    def status(self):
        if find_spec("PIL") is None:
            return False, "needs Pillow: pip install pillow"
        return True, "folder:PATH reads PATH/<class>/*.{png,jpg,jpeg,bmp,gif}; decoded once, then cached"


