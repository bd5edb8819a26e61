"""`cnncli predict`: class probabilities of many image files, in batches, to a table, CSV or JSON.

Files, folders (searched recursively) and glob patterns name the images; they are decoded one batch at a
time (as `folder:` decodes them), so thousands of files never sit in memory at once. The probabilities
are `interpret.softmax_fn`'s, with the run's fitted temperature.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnncli.console import to_json
from cnncli.data.sources.folder import IMAGE_EXTENSIONS
from cnncli.errors import UserError
from cnncli.inspect.interpret import load_model, map_stream, read_images, softmax_fn, top_classes

OUT_FORMATS = (".csv", ".json")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(specs: list[str]) -> list[Path]:
    """The image files named by `specs`: files, folders (recursively, hidden ones skipped) and glob patterns.

    Raises:
        UserError: A spec that names no image (a missing file, an empty folder, a pattern matching nothing).
    """
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if _is_image(p)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            what = f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder {path}"
        elif path.is_file():
            images, what = [path], ""
        elif glob.has_magic(spec):
            images = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image(p))
            what = f"no image file matches {spec}"
        else:
            images, what = [], f"no such image file or folder: {spec}"
        if not images:
            raise UserError(what)
        found.update(dict.fromkeys(images))
    return list(found)


def predict_files(trained, paths: list[Path], *, top: int, batch_size: int,
                  progress: Callable[[int, int], None] | None = None) -> Iterator[dict[str, Any]]:
    """{image, top: [{class, index, probability}]} per file, most probable class first, batch by batch."""
    names = trained.class_names
    batches = [paths[i: i + batch_size] for i in range(0, len(paths), batch_size)]
    decoded = (read_images(batch, trained.image_shape) for batch in batches)
    probs = map_stream(load_model(trained), softmax_fn(trained.temperature), decoded, min(batch_size, len(paths)))
    done = 0
    for batch, p in zip(batches, probs):
        indices, values = top_classes(p, top)
        for path, idx, ps in zip(batch, indices, values):
            yield {"image": str(path), "top": [{"class": names[j], "index": int(j), "probability": float(v)}
                                               for j, v in zip(idx, ps)]}
        done += len(batch)
        if progress is not None:
            progress(done, len(paths))


def check_out(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in OUT_FORMATS:
        raise UserError(f"--out {path}: write .csv or .json (the format follows the suffix)")


def write_predictions(rows: list[dict[str, Any]], path: Path) -> None:
    """CSV (one row per image: image, class_1, probability_1, ..., as timm's inference writes) or JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(to_json(rows))  # strict JSON: a NaN probability is null
        return
    k = max((len(r["top"]) for r in rows), default=0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *[c for i in range(1, k + 1) for c in (f"class_{i}", f"probability_{i}")]])
        for r in rows:
            writer.writerow([r["image"], *[v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}")]])
