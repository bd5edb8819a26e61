"""`cnncli benchmark`: images/s of the jitted steps, comparable with benchmarks/torch_peer.py."""


import typer

from cnncli.cli import TOOLS, app


@app.command(rich_help_panel=TOOLS)
def benchmark(
    model: str = typer.Option("lenet5", "--model", help="lenet5, resnet18 or vgg16 (the PyTorch peer's nets)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per step."),
    mode: str = typer.Option("train", "--mode",
                             help="train (one SGD step), eval (inference) or fgsm (one FGSM example per image)."),
    steps: int = typer.Option(0, "--steps", min=0, help="Timed steps (0: about 10 s of work)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed steps first (compilation happens here)."),
    precision: str = typer.Option("auto", "--precision",
                                  help="float32, bfloat16, or auto (bfloat16 on GPUs of compute capability 8.0+ "
                                       "and TPUs, float32 elsewhere: what train.precision: auto trains in). The JSON "
                                       "line's dtype is the precision the steps computed in."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON line (the peer's schema)."),
    peak: bool = typer.Option(False, "--peak",
                              help="First measure this machine's float32 matmul rate (stored for later runs), "
                                   "the reference of peak_fraction."),
) -> None:
    """Time the jitted train, eval or fgsm step on synthetic data after compilation.

    The JSON line has the PyTorch peer's fields plus gflops (achieved, from the model's FLOP count),
    peak_gflops and peak_fraction (once `--peak` has measured the peak on this machine).
    """
    from cnncli.console import console, to_json
    from cnncli.tools import benchmark as bench

    if peak:
        rate = bench.measure_peak()
        if not as_json:
            console.print(f"float32 matmul peak: [bold]{rate:,.0f} GFLOP/s[/] (stored in {bench.peak_file()})")
    result = bench.run(model=model, batch=batch_size, mode=mode, steps=steps, warmup=warmup, precision=precision)
    if not as_json:
        fraction = (f", {result['peak_fraction']:.0%} of the matmul peak" if result["peak_fraction"]
                    else " (run with --peak once for the fraction of this machine's peak)")
        console.print(f"{model} {mode} batch {batch_size}: [bold]{result['img_per_s']:,.0f} img/s[/], "
                      f"{result['gflops']:,.0f} GFLOP/s{fraction} ({result['steps']} steps in {result['dtype']} on "
                      f"{result['device']})")
    print(to_json(result))
