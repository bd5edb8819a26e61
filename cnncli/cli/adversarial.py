"""`cnncli adversarial` (alias `cnncli attack`): attack a trained run, measure robust accuracy, draw the figures."""

from pathlib import Path

import typer

from cnncli.cli import ATTACK, app
from cnncli.cli.eval import CLASS_MAP
from cnncli.errors import UserError

DEFAULT_EPS = "0,0.02,0.05,0.1,0.2"
AUTOATTACK = "autoattack"


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
    attack: str = typer.Option("fgsm", "--attack", "-a",
                               help="autoattack, or one attack: fgsm, fgm-l2, bim, pgd, mi-fgsm, apgd-ce, apgd-dlr, "
                                    "apgd-t, fab, fab-t, square, cw-l2, deepfool, linear-fool."),
    eps: str = typer.Option(DEFAULT_EPS, "--eps", help="Comma-separated perturbation budgets (Linf: pixels, [0, 1])."),
    version: str = typer.Option("standard", "--version",
                                help="autoattack: standard (apgd-ce, apgd-t, fab-t, square), plus, rand (EOT, for "
                                     "random models) or custom (--attacks)."),
    attacks: str = typer.Option(None, "--attacks", help="autoattack --version custom: comma-separated attacks, run "
                                                         "in this order, e.g. apgd-ce,apgd-t [default: none; "
                                                         "custom needs it]."),
    targeted: str = typer.Option(None, "--targeted", help="Target: a class index or name, least-likely or "
                                                            "random [default: untargeted]."),
    steps: int = typer.Option(None, "--steps", help="Iterations [default: the attack's own: bim/pgd/mi-fgsm 10, "
                                                    "apgd/fab/cw-l2 100, deepfool 50]."),
    step_size: float = typer.Option(None, "--step-size", help="bim/pgd/mi-fgsm step [default: 2.5 * eps / steps; "
                                                              "mi-fgsm eps / steps]."),
    restarts: int = typer.Option(None, "--restarts", help="Random restarts [default: 1] (pgd keeps the strongest, "
                                                          "the AutoAttack attacks the first success)."),
    n_targets: int = typer.Option(None, "--n-targets", help="apgd-t/fab-t: top classes targeted in turn [default: 9]."),
    queries: int = typer.Option(None, "--queries", help="square: queries per run [default: 5000]."),
    eot: int = typer.Option(None, "--eot", help="apgd: gradient samples per step for random models [default: 1]."),
    decay: float = typer.Option(1.0, "--decay", help="mi-fgsm: momentum decay."),
    cw_c: float = typer.Option(1.0, "--cw-c", help="cw-l2: weight of the misclassification term."),
    kappa: float = typer.Option(0.0, "--kappa", help="cw-l2: logit margin to reach."),
    norm: str = typer.Option(None, "--norm", help="linf or l2 [default: the attack's own: fgm-l2/cw-l2 l2, "
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
    seed: int = typer.Option(0, "--seed", help="Randomness of random starts, targets and queries."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs (and autoattack's .npz) [default: the "
                                                 "run's plots/]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Attack a trained model at several epsilons: robust accuracy table, accuracy curve and example grid.

    Pixels are in [0, 1]; eps is the Linf (or L2) radius of the perturbation. `--attack autoattack`
    runs the standard AutoAttack evaluation of RobustBench (Croce & Hein 2020): each attack only on
    the points still robust, robust accuracy after each one, and the adversarial images saved as .npz.
    Examples:
    cnncli adversarial runs/lenet5_fashion_mnist --attack pgd --eps 0,0.05,0.1 --steps 20 --step-size 0.01
    cnncli adversarial runs/lenet5_fashion_mnist --attack autoattack --eps 0.1
    """

    from cnncli.adversarial.attacks import ATTACKS, AttackConfig, check_config, check_eps, step_size_warning
    from cnncli.console import console, err_console, progress_bar, to_json
    from cnncli.train.steps import data_mesh
    from cnncli.train.trained_run import load_trained

    if attack == AUTOATTACK:
        return _autoattack(path, eps, version, attacks, norm or "linf", steps, restarts, n_targets, queries, eot,
                           targeted, use_predictions, split, data, class_map, limit, which, batch_size, seed, out,
                           as_json)
    if attacks is not None or version != "standard":
        raise UserError("--version and --attacks belong to --attack autoattack")
    spec = ATTACKS.get(attack)
    cfg_norm = norm or spec.norms[0]
    eps_values = check_eps(parse_eps(eps), cfg_norm)
    trained = load_trained(path, which)
    names = trained.class_names
    given = {k: v for k, v in {"restarts": restarts, "targets": n_targets, "queries": queries, "eot": eot}.items()
             if v is not None}
    cfg = AttackConfig(name=attack, norm=cfg_norm, steps=spec.default_steps if steps is None else steps,
                       step_size=step_size, target=parse_target(targeted, names), decay=decay, c=cw_c, kappa=kappa,
                       **given)
    check_config(cfg, names)  # before the data is loaded: a mistake costs no time
    warning = step_size_warning(cfg, eps_values)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    x, y, split = _attacked_data(trained, split, data, class_map, limit)
    from cnncli.adversarial.robustness import robustness

    with progress_bar(f"{attack} on {split}", disable=as_json) as advance:
        result = robustness(trained.model, x, y, names, cfg, eps_values, batch_size=batch_size, mesh=data_mesh(),
                            use_predictions=use_predictions, seed=seed, examples=examples, progress=advance)
    result.update(split=split, checkpoint=str(trained.checkpoint), plots=_plots(result, trained, cfg, out))
    result.pop("examples")
    _warn(result["warnings"], err_console)
    if as_json:
        print(to_json(result))
        return
    render(result, console)


def _attacked_data(trained, split, data, class_map, limit):
    """The images, labels and split name an attack runs on (classes matched by name, notes said, --limit applied)."""
    from rich.markup import escape

    from cnncli.console import err_console
    from cnncli.data.classes import parse_class_map
    from cnncli.train.trained_run import eval_data

    chosen = eval_data(trained, split, data, parse_class_map(class_map))
    for note in chosen.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    x, y = (chosen.x, chosen.y) if limit is None else (chosen.x[:limit], chosen.y[:limit])
    return x, y, chosen.split


def _warn(warnings: list[str], err_console) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _autoattack(path, eps, version, attacks, norm, steps, restarts, n_targets, queries, eot, targeted,
                use_predictions, split, data, class_map, limit, which, batch_size, seed, out, as_json) -> None:
    """`--attack autoattack`: the evaluation, its table, the curve over eps and the .npz of adversarial images."""

    from cnncli.adversarial.attacks import NORMS, check_eps
    from cnncli.adversarial.autoattack import autoattack, version_attacks, with_overrides
    from cnncli.console import console, err_console, progress_bar, to_json
    from cnncli.train.steps import data_mesh
    from cnncli.train.trained_run import load_trained

    if targeted is not None or use_predictions:
        raise UserError("AutoAttack measures untargeted robust accuracy against the labels: drop --targeted and "
                        "--use-predictions")
    if norm not in NORMS:
        raise UserError(f"--norm must be linf or l2, got '{norm}'")
    eps_values = check_eps(parse_eps(eps), norm)
    names = [a.strip() for a in attacks.split(",") if a.strip()] if attacks else None
    configs = with_overrides(version_attacks(version, norm, names), steps=steps, restarts=restarts,
                             targets=n_targets, queries=queries, eot=eot)
    trained = load_trained(path, which)
    x, y, split = _attacked_data(trained, split, data, class_map, limit)
    with progress_bar(f"autoattack ({version}) on {split}", disable=as_json) as advance:
        result = autoattack(trained.model, x, y, trained.class_names, eps_values, version=version, norm=norm,
                            configs=configs, batch_size=batch_size, mesh=data_mesh(), seed=seed, progress=advance)
    if any(v is not None for v in (steps, restarts, n_targets, queries, eot)) and version != "custom":
        result["warnings"].insert(0, f"settings changed from the {version} version's: the numbers are not "
                                     "comparable with RobustBench's")
    folder = out or trained.run.plots
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"adversarial_autoattack_{version}_{norm}"
    title = f"{trained.recipe.name}: AutoAttack {version} ({norm})"
    from cnncli.adversarial.plots import autoattack_curve

    result.update(split=split, checkpoint=str(trained.checkpoint),
                  plots=[str(autoattack_curve(result, folder / f"{stem}_curve.png", title))],
                  npz=_save_examples(result.pop("examples"), x, y, trained.class_names, folder, stem))
    _warn(result["warnings"], err_console)
    if as_json:
        print(to_json(result))
        return
    render_autoattack(result, console)


def _save_examples(examples, x, y, class_names, folder: Path, stem: str) -> list[str]:
    """One .npz per eps: x (adversarial float32 pixels), y, class_names (readable as `--data npz:FILE`), and
    robust (per image: survived every attack), eps, x_clean."""
    import numpy as np

    paths = []
    for item in examples:
        path = folder / f"{stem}_eps{item['eps']:g}.npz"
        np.savez_compressed(path, x=item["x_adv"].astype(np.float32), y=np.asarray(y, np.int64),
                            class_names=np.asarray(class_names, dtype=str), robust=item["robust"],
                            eps=np.float32(item["eps"]), x_clean=x)
        paths.append(str(path))
    return paths


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


def render_autoattack(result: dict, console) -> None:
    """One row per attack of the sequence, one column pair (robust accuracy, seconds) per eps."""
    from rich.table import Table

    attack, rows = result["attack"], result["rows"]
    table = Table(title=f"AutoAttack {attack['version']} ({attack['norm']}) on {result['split']}: {rows[0]['n']:,} "
                        f"images, clean accuracy {rows[0]['clean_accuracy']:.2%}")
    table.add_column("after")
    for r in rows:
        table.add_column(f"eps {r['eps']:g}\nrobust acc.", justify="right")
        table.add_column("time", justify="right")
    for i, stage in enumerate(rows[0]["stages"]):
        cells = []
        for r in rows:
            s = r["stages"][i]
            cells += [f"{s['robust_accuracy']:.2%}", "-" if s["attack"] == "clean" else f"{s['seconds']:.1f} s"]
        table.add_row(stage["attack"], *cells)
    table.add_row("max Linf / L2", *[c for r in rows for c in (f"{r['max_linf']:.4f}", f"{r['max_l2']:.3f}")])
    console.print(table)
    for p in result["plots"] + result["npz"]:
        console.print(f"wrote {p}", highlight=False)


app.command("adversarial", rich_help_panel=ATTACK)(adversarial)
app.command("attack", help="Alias of `cnncli adversarial`.", rich_help_panel=ATTACK)(adversarial)
