"""`cnncli summary RECIPE_OR_MODEL`: the per-layer table of a network (shapes, parameters, MACs,
activation memory, receptive field), as the lectures tabulate VGG-16."""


import typer

from cnncli.cli import INSPECT, app
from cnncli.errors import UserError

PIPE_WIDTH = 150

# Image shape and class count of the named sources, so that a recipe's table needs no data on disk.
KNOWN_SOURCES = {
    "fashion_mnist": ((28, 28, 1), 10),
    "digits": ((8, 8, 1), 10),
    "tfds:mnist": ((28, 28, 1), 10),
    "tfds:fashion_mnist": ((28, 28, 1), 10),
    "tfds:cifar10": ((32, 32, 3), 10),
    "tfds:cifar100": ((32, 32, 3), 100),
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'224x224x3' -> (224, 224, 3); 'HxW' means one channel."""
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) == 2:
        dims = (*dims, 1)
    if len(dims) != 3 or min(dims) < 1:
        raise UserError(f"--input expects HxWxC, e.g. 224x224x3, got '{text}'")
    return dims


def _recipe_input(recipe) -> tuple[tuple[int, int, int], int]:
    """The recipe's image shape and class count: from the source's known shape, else by loading it."""
    data = recipe.data
    if data.source in KNOWN_SOURCES:
        shape, classes = KNOWN_SOURCES[data.source]
    else:
        from cnncli.data.sources import load_dataset

        try:
            ds = load_dataset(data.source, image_size=data.image_size, channels=data.channels)
        except UserError as e:
            raise UserError(f"{e} (or give the shape with --input HxWxC)") from None
        shape, classes = tuple(ds.train_x.shape[1:]), ds.num_classes
    h, w, c = shape
    if data.image_size:
        h, w = data.image_size
    c = data.channels or c
    return (h, w, c), len(data.classes) if data.classes else classes


def _parse_options(assignments: list[str]) -> dict:
    from cnncli.errors import brief
    from cnncli.recipe import parse_yaml

    options = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep:
            raise UserError(f"--set expects OPTION=VALUE (e.g. classifier=linear), got {brief(a)}")
        options[key.strip()] = parse_yaml(value, f"--set {key.strip()}")
    return options


@app.command(rich_help_panel=INSPECT)
def summary(
    target: str = typer.Argument(..., help="A recipe (file or bundled name), a registered model name, or a run "
                                           "directory."),
    input_shape: str = typer.Option(None, "--input", metavar="HxWxC",
                                    help="Input image shape [default: the recipe's data, or what the model is "
                                         "designed for]."),
    classes: int = typer.Option(None, "--classes", min=1, help="Number of classes [default: the recipe's data, "
                                                               "else 10]."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Batch for the memory total [default: the "
                                                                     "recipe's train.batch_size, else 1]."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set model.dropout=0.5; for a model name, "
                                             "a model option, e.g. --set classifier=linear (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Per-layer table: output shape, parameters, MACs, activation memory, receptive field, stride."""
    from pathlib import Path

    from flax import nnx

    from cnncli.console import to_json
    from cnncli.inspect.summary import summarize
    from cnncli.models import build_network, default_input, model_options, registered_models
    from cnncli.recipe import load
    from cnncli.run.rundir import RunDir

    names = registered_models()
    # A model name wins over a bundled recipe of the same name (`cnncli summary vgg16` is the
    # architecture); a path to an existing file is always a recipe.
    if Path(target).is_dir() and (Path(target) / "recipe.yaml").is_file():
        # A run directory: its resolved recipe, and the image shape and classes it was trained on.
        recipe = load(Path(target) / "recipe.yaml", overrides)
        data = RunDir(target).read_json(Path(target) / "data.json")
        name, options = recipe.model.name, model_options(recipe.model)
        shape, n_classes = tuple(data["image_shape"]), len(data["class_names"])
        run_batch = recipe.train.batch_size
    elif target in names and not Path(target).is_file():
        name, options = target, _parse_options(overrides)
        shape, n_classes = default_input(name)
        run_batch = 1
    else:
        try:
            recipe = load(target, overrides)
        except UserError as e:
            from cnncli.errors import suggest

            if "not found" in str(e):
                raise UserError(f"'{target}' is neither a recipe nor a registered model{suggest(target, names)}; "
                                f"see `cnncli recipes` and `cnncli models`") from None
            raise
        name, options = recipe.model.name, model_options(recipe.model)
        shape, n_classes = _recipe_input(recipe) if input_shape is None else (None, None)
        if n_classes is None:
            n_classes = KNOWN_SOURCES.get(recipe.data.source, (None, 10))[1]
        run_batch = recipe.train.batch_size
    shape = parse_shape(input_shape) if input_shape else shape
    n_classes = classes or n_classes
    run_batch = batch_size or run_batch
    net = nnx.eval_shape(lambda: build_network(name, input_shape=shape, num_classes=n_classes, **options))
    result = summarize(net, shape, batch=run_batch)
    if as_json:
        typer.echo(to_json({"model": name, "num_classes": n_classes, **result.to_dict()}))
        return
    _print_table(name, n_classes, result)


def _rf(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _print_table(name: str, n_classes: int, s) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console, fmt_count

    h, w, c = s.input_shape
    table = Table(title=f"{name}: input {h}x{w}x{c}, {n_classes} classes", show_footer=True)
    columns = [("layer", "total", "left"), ("type", "", "left"), ("output", "", "right"),
               ("params", f"{s.total_params:,}", "right"), ("MACs", fmt_count(s.total_macs), "right"),
               ("activations", fmt_count(s.activation_elements), "right"), ("RF", "", "right"),
               ("jump", "", "right")]
    for title, footer, justify in columns:
        table.add_column(title, footer=footer, justify=justify, no_wrap=title != "type")
    for r in s.layers:
        table.add_row(escape(r.name), escape(r.description), "x".join(map(str, r.output_shape)), f"{r.params:,}",
                      fmt_count(r.macs) if r.macs else "", fmt_count(r.activation_elements), _rf(r.receptive_field),
                      _rf(r.jump))
    # In a pipe Rich assumes 80 columns, too narrow for 8 columns: give the table room there.
    out = console if console.is_terminal else Console(width=PIPE_WIDTH, highlight=False)
    out.print(table)
    per_image = s.activation_bytes
    out.print(f"parameters {s.total_params:,} ({fmt_count(s.total_params * 4)}B as float32) | "
                  f"MACs {s.total_macs:,} | FLOPs {fmt_count(s.total_flops)} (2 x MACs) | "
                  f"forward activations {s.activation_elements:,} per image ({fmt_count(per_image)}B), "
                  f"{fmt_count(per_image * s.batch)}B for a batch of {s.batch}", highlight=False)
