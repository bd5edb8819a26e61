"""`cnncli adversarial` (alias `cnncli attack`): attack a trained run, measure robust accuracy, draw the figures."""

import json
from pathlib import Path

import typer

from cnncli.cli import ATTACK, app
from cnncli.cli.eval import CLASS_MAP
from cnncli.errors import UserError

DEFAULT_EPS = "0,0.02,0.05,0.1,0.2"


def parse_eps(text: str) -> list[float]:
    """'0,0.05,0.1' -> [0.0, 0.05, 0.1]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--eps expects numbers separated by commas (e.g. 0,0.05,0.1), got '{text}'") from None


def parse_target(text: str | None, class_names: list[str]) -> int | str | None:
    """A class index or name, 'least-likely' or 'random' (None: untargeted)."""
    from cnncli.adversarial.attacks import TARGET_MODES

    if text is None or text in TARGET_MODES:
        return text
    if text.lstrip("-").isdigit():
        return int(text)  # range-checked with the attack's other settings
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    from cnncli.errors import suggest

    raise UserError(f"target class '{text}' does not exist{suggest(text, class_names)}; give a class index "
                    f"0..{len(class_names) - 1}, a class name, {' or '.join(TARGET_MODES)}")


def adversarial(
    path: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    attack: str = typer.Option("fgsm", "--attack", "-a", help="fgsm, fgm-l2, bim, pgd or linear-fool."),
    eps: str = typer.Option(DEFAULT_EPS, "--eps", help="Comma-separated perturbation budgets, pixels in [0, 1]."),
    targeted: str = typer.Option(None, "--targeted", help="Target: a class index or name, least-likely or "
                                                            "random [default: untargeted]."),
    steps: int = typer.Option(10, "--steps", help="bim/pgd iterations."),
    step_size: float = typer.Option(None, "--step-size", help="bim/pgd step [default: 2.5 * eps / steps]."),
    restarts: int = typer.Option(1, "--restarts", help="pgd random restarts (the strongest per image is kept)."),
    norm: str = typer.Option(None, "--norm", help="linf or l2 [default: the attack's own: fgsm linf, fgm-l2 l2, "
                                                   "others linf]."),
    use_predictions: bool = typer.Option(False, "--use-predictions",
                                         help="Attack the model's predictions instead of the labels (no label "
                                              "leaking)."),
    split: str = typer.Option(None, "--split", help="train, val, test or all [default: test; with --data: test "
                                                    "where the source has one, else all]."),
    data: str = typer.Option(None, "--data", help="Attack images of another dataset source, e.g. folder:PATH, "
                                                  "classes matched to the run's by name [default: the run's own "
                                                  "data]."),
    class_map: str = CLASS_MAP,
    limit: int = typer.Option(None, "--limit", min=1, help="Attack only the first N images of the split "
                                                           "[default: all]."),
    examples: int = typer.Option(8, "--examples", min=0, help="Images in the example grid (0: no grid)."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    batch_size: int = typer.Option(500, "--batch-size", min=1, help="Images per attack step."),
    seed: int = typer.Option(0, "--seed", help="Randomness of pgd starts and random targets."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs [default: the run's plots/]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Attack a trained model at several epsilons: robust accuracy table, accuracy curve and example grid.

    Pixels are in [0, 1]; eps is the Linf (or L2) radius of the perturbation. Example:
    cnncli adversarial runs/lenet5_fashion_mnist --attack pgd --eps 0,0.05,0.1 --steps 20 --step-size 0.01
    """
    from rich.markup import escape

    from cnncli.adversarial.attacks import ATTACKS, AttackConfig, check_config, check_eps, step_size_warning
    from cnncli.adversarial.robustness import robustness
    from cnncli.console import console, err_console, progress_bar
    from cnncli.data.classes import parse_class_map
    from cnncli.train.steps import data_mesh
    from cnncli.train.trained_run import eval_data, load_trained

    eps_values = check_eps(parse_eps(eps))
    spec = ATTACKS.get(attack)
    trained = load_trained(path, which)
    names = trained.class_names
    cfg = AttackConfig(name=attack, norm=norm or spec.norms[0], steps=steps, step_size=step_size, restarts=restarts,
                       target=parse_target(targeted, names))
    check_config(cfg, names)  # before the data is loaded: a mistake costs no time
    warning = step_size_warning(cfg, eps_values)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    chosen = eval_data(trained, split, data, parse_class_map(class_map))
    for note in chosen.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    x, y, split = chosen.x, chosen.y, chosen.split
    if limit is not None:
        x, y = x[:limit], y[:limit]
    with progress_bar(f"{attack} on {split}", disable=as_json) as advance:
        result = robustness(trained.model, x, y, names, cfg, eps_values, batch_size=batch_size, mesh=data_mesh(),
                            use_predictions=use_predictions, seed=seed, examples=examples, progress=advance)
    result.update(split=split, checkpoint=str(trained.checkpoint), plots=_plots(result, trained, cfg, out))
    result.pop("examples")
    if as_json:
        print(json.dumps(result))
        return
    render(result, console)


def _plots(result: dict, trained, cfg, out: Path | None) -> list[str]:
    """Write the accuracy curve and (when asked for) the example grid; returns their paths."""
    from cnncli.adversarial.plots import accuracy_curve, example_grid

    folder = out or trained.run.plots
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"adversarial_{cfg.name}_{cfg.norm}" + (f"_target_{cfg.target}" if cfg.targeted else "")
    title = f"{trained.recipe.name}: {cfg.name} ({cfg.norm})" + (f", target {cfg.target}" if cfg.targeted else "")
    paths = [accuracy_curve(result, folder / f"{stem}_curve.png", title)]
    if result["examples"] is not None:
        paths.append(example_grid(result["examples"], trained.class_names, folder / f"{stem}_examples.png", title))
    return [str(p) for p in paths]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render(result: dict, console) -> None:
    """The Rich table: one row per epsilon."""
    from rich.table import Table

    attack = result["attack"]
    target = f", target {attack['target']}" if attack["target"] is not None else ""
    rows = result["rows"]
    table = Table(title=f"{attack['name']} ({attack['norm']}{target}) on {result['split']}: {rows[0]['n']:,} images, "
                        f"clean accuracy {rows[0]['clean_accuracy']:.2%}")
    columns = ("eps", "accuracy", "error", "success", "conf. on\nwrong", "Linf\nmean", "Linf\nmax", "L2\nmean",
               "L2\nmax")
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['eps']:g}", _pct(r["accuracy"]), _pct(r["error_rate"]), _pct(r["success_rate"]),
                      _pct(r["mean_conf_wrong"]), f"{r['mean_linf']:.4f}", f"{r['max_linf']:.4f}",
                      f"{r['mean_l2']:.3f}", f"{r['max_l2']:.3f}")
    console.print(table)
    for p in result["plots"]:
        console.print(f"wrote {p}", highlight=False)


app.command("adversarial", rich_help_panel=ATTACK)(adversarial)
app.command("attack", help="Alias of `cnncli adversarial`.", rich_help_panel=ATTACK)(adversarial)
