"""`cnncli benchmark`: images/s of the jitted steps, comparable with ../shared/peers/torch_peer.py."""

import json

import typer

from cnncli.cli import app


@app.command()
def benchmark(
    model: str = typer.Option("lenet5", "--model", help="lenet5, resnet18 or vgg16 (the PyTorch peer's nets)."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size."),
    mode: str = typer.Option("train", "--mode",
                             help="train (one SGD step), eval (inference) or fgsm (one FGSM example per image)."),
    steps: int = typer.Option(0, "--steps", min=0, help="Timed steps (0: about 10 s of work)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed steps first (compilation happens here)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON line (the peer's schema)."),
) -> None:
    """Time the jitted train, eval or fgsm step on synthetic data after compilation."""
    from cnncli import benchmark as bench
    from cnncli.console import console

    result = bench.run(model=model, batch=batch, mode=mode, steps=steps, warmup=warmup)
    if not as_json:
        console.print(f"{model} {mode} batch {batch}: [bold]{result['img_per_s']:,.0f} img/s[/] "
                      f"({result['steps']} steps on {result['device']})")
    print(json.dumps(result))
