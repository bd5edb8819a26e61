"""`cnncli data ...`: dataset commands (prepare a TFDS dataset, convert any dataset to ArrayRecord)."""

from pathlib import Path

import typer

from cnncli.cli import DATA, app, command_group

data_app = command_group(help="Prepare datasets (TensorFlow Datasets) and convert them to ArrayRecord shards.")
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
