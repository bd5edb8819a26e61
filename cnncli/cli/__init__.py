"""The `cnncli` command line: a thin Typer app; each command lives in its own module.

Heavy imports (jax, flax, tensorflow) happen inside command bodies so that `cnncli --help`
stays instant. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

import importlib
import pkgutil

import typer
from typer.core import TyperGroup

from cnncli import __version__
from cnncli.errors import EXIT_USER_ERROR, UserError


class _Group(TyperGroup):
    """Turns a UserError raised by any command into one red line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            from rich.markup import escape

            from cnncli.console import err_console

            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            ctx.exit(EXIT_USER_ERROR)


app = typer.Typer(
    cls=_Group,
    name="cnncli",
    help="Train, evaluate, fine-tune, inspect and attack convolutional image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    from cnncli.runtime import keep_freed_memory

    keep_freed_memory()  # before JAX allocates anything: large step buffers stay mapped between steps
    app()
