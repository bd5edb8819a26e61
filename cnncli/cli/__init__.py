"""The `cnncli` command line: a thin Typer app; each command lives in its own module.

Heavy imports (jax, flax, tensorflow) happen inside command bodies so that `cnncli --help`
stays instant. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

import importlib
import pkgutil
import signal

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from cnncli import __version__, interrupts
from cnncli.errors import EXIT_USER_ERROR, UserError, is_disk_full, os_fault

# The panels of `cnncli --help`; every command names one (`rich_help_panel=`; tests/test_cli_help.py checks).
TRAIN = "Train"
INSPECT = "Inspect"
ATTACK = "Attack"
DATA = "Data"
TOOLS = "Tools"
PANELS = (TRAIN, INSPECT, ATTACK, DATA, TOOLS)


def _literal_help(command) -> None:
    """Help texts are plain text: without this, Rich markup would eat `[default: ...]` and `cnncli[tfds]`."""
    for obj in (command, *command.params):
        for attr in ("help", "short_help", "epilog"):
            text = getattr(obj, attr, None)
            if text:
                setattr(obj, attr, escape(text))


class _Command(TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _literal_help(self)


class _Group(TyperGroup):
    """Turns a UserError, or a fault of the environment (full disk, read-only file system, no memory),
    raised by any command into one red line on stderr and exit code 2, and a stop signal into one line and
    128 + its number; adds the matching `--set KEY=VALUE` to an unknown option of a command that reads a
    recipe."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _literal_help(self)

    def list_commands(self, ctx) -> list[str]:
        """Panels in the order of PANELS (Train first), commands alphabetical inside each."""

        def panel_rank(name: str) -> int:
            panel = getattr(self.commands[name], "rich_help_panel", None)
            return PANELS.index(panel) if panel in PANELS else len(PANELS)

        return sorted(super().list_commands(ctx), key=lambda name: (panel_rank(name), name))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _error_line(str(e))
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as e:
            _stopped(ctx, getattr(e, "signum", None) or interrupts.requested() or signal.SIGINT)
        except Exception as e:
            if type(e).__name__ == "NoSuchOption":  # click's class is private to typer (typer._click)
                _hint_recipe_key(e)
                raise
            if interrupts.requested() is not None:  # a library turned the stop signal into its own error
                _stopped(ctx, interrupts.requested())
            message = environment_fault(e)
            if message is None:
                raise  # a bug in cnncli: keep the traceback
            _error_line(message)
            ctx.exit(EXIT_USER_ERROR)


def _stopped(ctx, signum: int) -> None:
    from cnncli.console import err_console

    err_console.print(f"stopped by {interrupts.describe(signum)}", highlight=False)
    ctx.exit(128 + signum)


def _error_line(text: str) -> None:
    from cnncli.console import err_console

    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def environment_fault(e: BaseException) -> str | None:
    """One line for an exception that reports the machine's limits rather than a bug; None otherwise."""
    if isinstance(e, MemoryError):
        return ("out of memory: the data or the model does not fit in this machine's RAM; lower data.image_size, "
                "data.limit or train.batch_size")
    if type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(e):
        return ("out of accelerator memory: lower train.batch_size or train.eval_batch_size (or use "
                "train.precision=bfloat16)")
    if is_disk_full(e):
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        return f"the disk is full{where}: free space and run the command again (a run continues with --resume)"
    fault = os_fault(e, "cannot read or write a file")
    return None if fault is None else str(fault)


def _hint_recipe_key(error) -> None:
    """`--weight-decay 0.1` on a command with --set: say `--set optim.weight_decay=0.1`."""
    command = error.ctx.command if getattr(error, "ctx", None) is not None else None
    if getattr(error, "hinted", False) or command is None or not isinstance(getattr(error, "option_name", None), str):
        return
    if not any("--set" in getattr(p, "opts", ()) for p in command.params):
        return
    from cnncli.recipe import recipe_keys

    wanted = error.option_name.lstrip("-").replace("-", "_").partition("=")[0]
    keys = [k for k in recipe_keys() if k.rpartition(".")[2] == wanted]
    error.hinted = True
    if keys:
        error.message += f"; recipe keys are set with --set, e.g. --set {keys[0]}=VALUE"
        if len(keys) > 1:
            error.message += f" (also: {', '.join(keys[1:])})"
    else:
        error.message += "; recipe keys are set with --set KEY=VALUE, e.g. --set train.epochs=5"


class _App(typer.Typer):
    """A Typer whose commands and groups render their help as plain text (see `_literal_help`)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", _Group)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


def command_group(**kwargs) -> typer.Typer:
    """A sub-command group (e.g. `cnncli data ...`) that behaves like the top level."""
    return _App(no_args_is_help=True, **kwargs)


app = _App(
    name="cnncli",
    help="Train, evaluate, fine-tune, inspect and attack convolutional image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Every module in this package registers its commands on `app` when imported (one module per
# command or group), so adding a command is adding a file.


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnncli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train, evaluate, fine-tune, inspect and attack convolutional image classifiers.

    Start with `cnncli recipes`, then `cnncli train lenet5_fashion_mnist`.
    """


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"cnncli.cli.{_module.name}")


def main() -> None:
    """Entry point of the `cnncli` script."""
    interrupts.install()  # first: a signal during start-up (imports, data loading, compiling) is never lost
    from cnncli.runtime import keep_freed_memory

    keep_freed_memory()  # before JAX allocates anything: large step buffers stay mapped between steps
    app()
