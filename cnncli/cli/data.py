"""`cnncli data ...`: dataset commands (show counts and examples, prepare a TFDS dataset, convert to ArrayRecord)."""

from pathlib import Path

import typer

from cnncli.cli import DATA, app, command_group

data_app = command_group(help="Look at a dataset (class counts, examples), prepare TFDS datasets, convert to "
                                "ArrayRecord shards.")
app.add_typer(data_app, name="data", rich_help_panel=DATA)


@data_app.command("prepare")
def prepare(
    spec: str = typer.Argument(..., help="tfds:NAME, e.g. tfds:cifar10"),
    data_dir: str = typer.Option(None, "--data-dir", help="TFDS data directory [default: $TFDS_DATA_DIR or "
                                                            "~/tensorflow_datasets]."),
) -> None:
    """Download and prepare a TFDS dataset (needs `pip install 'cnncli[prepare]'` and internet)."""
    from cnncli.console import console
    from cnncli.data.sources import parse_spec
    from cnncli.data.sources.tfds import prepare_tfds
    from cnncli.errors import UserError

    scheme, name = parse_spec(spec)
    if scheme != "tfds" or not name:
        raise UserError(f"`cnncli data prepare` prepares TFDS datasets: give tfds:NAME, not '{spec}'")
    path = prepare_tfds(name, data_dir)
    console.print(f"prepared tfds:{name} in {path}")


@data_app.command("convert")
def convert(
    source: str = typer.Argument(..., help="Any dataset: folder:PATH, fashion_mnist, cifar10:DIR, npz:PATH, ..."),
    to: str = typer.Option(..., "--to", help="Output format: array_record."),
    out: Path = typer.Argument(..., help="Output directory for the shards; read it back as arrayrecord:OUT."),
    per_shard: int = typer.Option(1024, "--per-shard", help="Records per shard file."),
    encoding: str = typer.Option("raw", "--encoding", help="How images of array sources (fashion_mnist, cifar10, "
                                 "npz, ...) are stored: raw pixels or png. Image files keep their own bytes."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Leave out unreadable image files (listed) "
                                      "instead of stopping at the first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the shards already in OUT."),
) -> None:
    """Pack a dataset into sharded ArrayRecord files (encoded images, labels, class names) for streaming.

    Train with it as `data.source: arrayrecord:OUT` (with `data.pipeline: stream` to read it lazily).
    Image files are copied as they are (never re-encoded); no TensorFlow is needed.
    """
    from cnncli.console import console, err_console, progress_bar
    from cnncli.data.convert import convert as convert_dataset
    from cnncli.errors import UserError

    if to != "array_record":
        raise UserError(f"--to {to}: the only output format is array_record")
    with progress_bar("converting") as advance:
        result = convert_dataset(source, out, per_shard=per_shard, encoding=encoding, overwrite=overwrite,
                                 skip_corrupt=skip_corrupt, progress=advance)
    for path in result.skipped:
        err_console.print(f"skipped unreadable {path}", highlight=False, soft_wrap=True)
    splits = ", ".join(f"{name} {n:,} records in {result.shards[name]} shards" for name, n in result.records.items())
    skipped = f"; {len(result.skipped)} unreadable files skipped" if result.skipped else ""
    console.print(f"wrote {splits} ({len(result.class_names)} classes) to {out}{skipped}; "
                  f"use it as data.source=arrayrecord:{out}", highlight=False, soft_wrap=True)


@data_app.command("show")
def show(
    source: str = typer.Argument(..., help="Any dataset: fashion_mnist, digits, folder:PATH, npz:PATH, ..."),
    split: str = typer.Option("train", "--split", help="train, test, or all (both)."),
    per_class: int = typer.Option(8, "--per-class", min=1, help="Example images per class in the grid."),
    image_size: str = typer.Option(None, "--image-size", metavar="HxW", help="Resize images to HxW (folders of "
                                                                              "mixed sizes need it) [default: the "
                                                                              "source's size]."),
    out: Path = typer.Option(None, "--out", help="PNG of the grid [default: data_NAME_SPLIT.png]."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object."),
) -> None:
    """Class counts, shares and imbalance (largest / smallest class) of a dataset, and a PNG grid of
    random examples of each class, labelled with the class and its count."""

    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console, to_json
    from cnncli.data.overview import class_counts, examples_per_class, split_arrays
    from cnncli.data.sources import load_dataset
    from cnncli.errors import UserError
    from cnncli.inspect import figures

    size = None
    if image_size is not None:
        try:
            size = tuple(int(v) for v in image_size.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"--image-size expects HxW, e.g. 64x64; got '{image_size}'")
    ds = load_dataset(source, image_size=size)
    x, y = split_arrays(ds, split)
    counts = class_counts(y, ds.class_names)
    picks = examples_per_class(y, ds.num_classes, per_class)
    h, w, c = x.shape[1:]
    labels = [f"{row['class']} ({row['count']:,})" for row in counts["classes"]]
    title = f"{source} / {split}: {counts['n']:,} images of {h}x{w}x{c}, {ds.num_classes} classes"
    out = out or Path(f"data_{ds.name}_{split}.png")
    figures.save(figures.class_examples([x[p] for p in picks], labels, title, per_class), out)
    counts.update(source=source, split=split, image_shape=[h, w, c], figure=str(out))
    if as_json:
        print(to_json(counts))
        return
    table = Table(title=title)
    for column in ("#", "class", "images", "share"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in counts["classes"]:
        table.add_row(str(row["index"]), escape(row["class"]), f"{row['count']:,}", f"{row['share']:.1%}")
    console.print(table)
    if counts["imbalance"] is None:
        ratio = "infinite: no images of " + ", ".join(counts["empty"])
    elif counts["imbalance"] == 1:
        ratio = "1.00 (every class has as many images)"
    else:
        ratio = f"{counts['imbalance']:.2f} ({counts['largest']} / {counts['smallest']})"
    console.print(f"imbalance (largest / smallest class): {ratio}", highlight=False, soft_wrap=True)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
