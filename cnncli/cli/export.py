"""`cnncli export RUN --format onnx|stablehlo`: the trained classifier as a file other runtimes serve."""

from pathlib import Path

import typer

from cnncli.cli import TOOLS, app

# The formats and layouts of cnncli.tools.export, here so that --help imports no jax (tests/test_export.py checks).
FORMATS = ("onnx", "stablehlo")
LAYOUTS = ("nhwc", "nchw")


@app.command(rich_help_panel=TOOLS)
def export(
    run: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    fmt: str = typer.Option("onnx", "--format", help=f"One of: {', '.join(FORMATS)}."),
    out: Path = typer.Option(None, "--out", help="File to write [default: RUN/model.onnx or "
                                                  "RUN/model.stablehlo]."),
    layout: str = typer.Option("nhwc", "--layout", help="Input layout: nhwc, or nchw as PyTorch models take it."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Fix the batch size [default: any batch]."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as one JSON object."),
) -> None:
    """Write the trained classifier as ONNX (jax2onnx) or StableHLO (jax.export, for JAX serving).

    The exported model takes float32 images with pixels in [0, 1] and any batch size, normalizes them
    inside, and returns logits; the ONNX metadata holds the class names, the input convention and the
    temperature fitted by `cnncli eval --temperature` (StableHLO: a .json file beside it). Before
    writing, the export runs on random images and must match cnncli's logits within 1e-4.
    ONNX needs `pip install 'cnncli[export]' && pip install --no-deps jax2onnx==0.17.1`.
    """

    from cnncli.console import console, progress_bar, to_json
    from cnncli.tools.export import export as export_run
    from cnncli.train.trained_run import load_trained

    trained = load_trained(run, which, ema=ema)
    out = out or trained.run.path / f"model.{fmt}"
    with progress_bar(f"export {fmt}", disable=as_json):
        written = export_run(trained, out, fmt, layout=layout, batch=batch_size)
    info = written.to_dict()
    if as_json:
        print(to_json(info))
        return
    shape = "x".join(str(d) for d in info["input_shape"])
    opset = f", opset {info['metadata']['opset']}" if "opset" in info["metadata"] else ""
    console.print(f"wrote {info['path']} ({info['bytes']:,} bytes, {fmt}{opset}): input {shape} pixels in [0, 1], "
                  f"output logits of {len(trained.class_names)} classes; max |logit difference| against cnncli "
                  f"{info['max_abs_diff']:.2g} on random images", highlight=False, soft_wrap=True)
