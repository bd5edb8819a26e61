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
    recipe: str = typer.Option(None, "--recipe", help="Time to accuracy instead: train this recipe once per seed "
                                                      "and report test accuracy (mean and spread) and seconds "
                                                      "[default: none: time single steps of --model]."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="With --recipe: seeds 0..N-1."),
    warmup_runs: int = typer.Option(0, "--warmup-runs", min=0,
                                    help="With --recipe: untimed runs first (the airbench protocol uses one)."),
    wall: bool = typer.Option(False, "--wall", help="With --recipe: also the wall time of `cnncli train RECIPE` "
                                                    "as a new process with a cold, then a warm compilation cache."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="With --recipe: override a recipe key (repeatable). Without: "
                                             "train.ema, train.ema_every and train.steps_per_call of the timed "
                                             "train steps."),
) -> None:
    """Time the jitted train, eval or fgsm step on synthetic data after compilation, or with --recipe the
    time to accuracy of a recipe over several seeds.

    The JSON line has the PyTorch peer's fields plus gflops (achieved, from the model's FLOP count),
    peak_gflops and peak_fraction (once `--peak` has measured the peak on this machine).

    With --recipe each seed's time is its training steps plus its final test pass (test-time
    augmentation included where the recipe has train.tta), with compilation and per-epoch validation
    left out, as airbench times its runs; the accuracy is the EMA weights' where the recipe keeps an EMA.
    """
    from cnncli.console import console, err_console, to_json
    from cnncli.tools import benchmark as bench

    if recipe is not None:
        say = None if as_json else (lambda text: err_console.print(text, highlight=False))
        result = bench.record(recipe, seeds, tuple(overrides), warmup_runs, progress=say)
        if wall:
            result["cnncli_train_wall"] = bench.wall_times(recipe, tuple(overrides))
        if not as_json:
            console.print(f"{result['recipe']} on {result['device_kind']} ({result['precision']}): test top-1 "
                          f"[bold]{result['test_top1_mean']:.2%}[/] mean of {result['seeds']} seeds (std "
                          f"{result['test_top1_std']:.2%}, {result['test_top1_min']:.2%}-"
                          f"{result['test_top1_max']:.2%}),"
                          f" [bold]{result['seconds_mean']:.2f} s[/] per run (max {result['seconds_max']:.2f} s; train"
                          " + final test, compilation left out)")
            for which, times in result.get("cnncli_train_wall", {}).items():
                console.print(f"`cnncli train {result['recipe']}`, {which} compilation cache: "
                              f"{times['wall_seconds']:.1f} s of wall time "
                              f"({times['compile_seconds']:.1f} s compiling)")
        print(to_json(result))
        return

    if peak:
        rate = bench.measure_peak()
        if not as_json:
            console.print(f"float32 matmul peak: [bold]{rate:,.0f} GFLOP/s[/] (stored in {bench.peak_file()})")
    result = bench.run(model=model, batch=batch_size, mode=mode, steps=steps, warmup=warmup, precision=precision,
                       overrides=tuple(overrides))
    if not as_json:
        fraction = (f", {result['peak_fraction']:.0%} of the matmul peak" if result["peak_fraction"]
                    else " (run with --peak once for the fraction of this machine's peak)")
        console.print(f"{model} {mode} batch {batch_size}: [bold]{result['img_per_s']:,.0f} img/s[/], "
                      f"{result['gflops']:,.0f} GFLOP/s{fraction} ({result['steps']} steps in {result['dtype']} on "
                      f"{result['device']})")
    print(to_json(result))
