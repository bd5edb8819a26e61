"""`cnncli import-weights`: a torchvision/timm state dict as a cnncli run directory."""

from pathlib import Path

import typer

from cnncli.cli import TOOLS, app
from cnncli.errors import UserError


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{what} expects comma-separated numbers, e.g. 0.485,0.456,0.406; got '{text}'") from None


def read_class_names(path: Path, count: int) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --class-names {path}: {e.strerror}") from None
    if len(names) != count:
        raise UserError(f"--class-names {path} has {len(names)} names, the weights' classifier {count} classes")
    return names


@app.command("import-weights", rich_help_panel=TOOLS)
def import_weights(
    arch: str = typer.Argument(..., help="torchvision's name: resnet18/34/50/101/152, vgg11/13/16/19 (+_bn), alexnet "
                                                 "(cnncli's alexnet_tv)."),
    path: Path = typer.Argument(..., help="State dict: .safetensors, or .pth/.pt (reading those needs torch)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run directory to write (eval, fine-tune, adversarial, "
                                                    "summary read it)."),
    mean: str = typer.Option(None, "--mean", help="Per-channel mean of the pixels in [0, 1] the weights expect "
                                                  "[default: ImageNet's 0.485,0.456,0.406]."),
    std: str = typer.Option(None, "--std", help="Per-channel std [default: ImageNet's 0.229,0.224,0.225]."),
    input_shape: str = typer.Option("224x224x3", "--input", help="Image size the run records, HxWxC."),
    class_names: Path = typer.Option(None, "--class-names", help="Text file, one class name per line "
                                                                 "[default: class_000, class_001, ...]."),
    data: str = typer.Option(None, "--data", help="Dataset source the weights were trained on [default: "
                                                  "tfds:imagenet2012 for 1000 classes]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --run-dir."),
) -> None:
    """Import PyTorch weights (torchvision or timm names) as a cnncli run.

    Layouts are converted (OIHW to HWIO, linear layers transposed, batch-norm
    running statistics kept). cnncli models take pixels in [0, 1], so the
    weights' normalization (ImageNet's unless --mean/--std) is the first op.
    """
    from cnncli.cli.train import writing
    from cnncli.run.rundir import RunDir

    run = RunDir(run_dir)
    with writing(run):
        run.check_new(overwrite, "(an imported run is not resumed)")
        _import(run, arch, path, mean, std, input_shape, class_names, data, overwrite)


def _import(run, arch, path, mean, std, input_shape, class_names, data, overwrite) -> None:
    from cnncli.cli.summary import parse_shape
    from cnncli.console import console
    from cnncli.transfer.import_weights import (
        IMAGENET_MEAN,
        IMAGENET_SOURCE,
        IMAGENET_STD,
        import_state_dict,
        read_state_dict,
        write_run,
    )

    shape = parse_shape(input_shape)
    means = parse_floats(mean, "--mean") if mean else IMAGENET_MEAN
    stds = parse_floats(std, "--std") if std else IMAGENET_STD
    if any(s <= 0 for s in stds):
        raise UserError("--std values must be positive")
    imported = import_state_dict(arch, read_state_dict(path), source=str(path), input_shape=shape, mean=means,
                                 std=stds)
    n = imported.num_classes
    if data is None and n != 1000:
        raise UserError(f"the weights classify {n} classes, not ImageNet's 1000: name the dataset they were "
                        "trained on with --data (e.g. --data tfds:cifar10)")
    names = read_class_names(class_names, n) if class_names else [f"class_{i:0{len(str(n - 1))}d}" for i in range(n)]
    write_run(run, imported, source=path, class_names=names, data_source=data or IMAGENET_SOURCE, overwrite=overwrite)
    console.print(f"{arch}: {imported.num_params:,} parameters, {n} classes, input {input_shape}, from {path} -> "
                  f"{run.path}\nnext: `cnncli eval {run.path} --data SOURCE`, `cnncli fine-tune {run.path} RECIPE`, "
                  f"`cnncli summary {run.path}`", highlight=False)
