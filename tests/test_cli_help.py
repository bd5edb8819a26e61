"""Every command's --help, rendered as a user sees it: bracketed texts survive, defaults show, option names agree."""

import re

import pytest
import typer
import typer.rich_utils

from cnncli.cli import PANELS, app
from tests.helpers import cli

BOX = re.compile(r"[│╭╮╰╯─]")


def _commands():
    """(path, click command) for every command, sub-commands of groups included."""
    root = typer.main.get_command(app)
    found = []

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, [*prefix, name])
            else:
                found.append(([*prefix, name], command))

    walk(root, [])
    return root, found


ROOT, COMMANDS = _commands()
IDS = [" ".join(path) for path, _ in COMMANDS]


def _flat(text: str) -> str:
    return " ".join(BOX.sub(" ", text).split())


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    # one line per option: nothing a test looks for is split by wrapping
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)


def _help(path) -> str:
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    return _flat(result.output)


def _options(command):
    return [p for p in command.params if p.param_type_name == "option" and p.name != "help"]


def _source_help(text: str) -> str:
    """The help as written in the code (before rendering), with Rich's escapes taken out again."""
    return _flat(text.replace("\\[", "["))


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_keeps_bracketed_text_and_shows_defaults(path, command):
    rendered = _help(path)
    texts = [command.help or ""] + [p.help or "" for p in command.params]
    for text in texts:
        for bracketed in re.findall(r"\[[^\]]*\]", _source_help(text)):
            assert bracketed in rendered, f"`cnncli {' '.join(path)} --help` lost {bracketed!r}"
    for option in _options(command):
        name = option.opts[0]
        if option.is_flag or option.required or option.hidden:
            continue
        default = option.default
        if default is None:
            # what happens without the option is part of the help text
            assert "[default:" in (option.help or ""), f"{' '.join(path)} {name}: say its default in the help"
        elif default != [] and option.show_default is not False:
            shown = str(default.value if hasattr(default, "value") else default)
            assert f"[default: {shown}]" in rendered, f"{' '.join(path)} {name}: default {shown!r} not shown"


def test_install_extras_survive_in_help():
    assert "pip install 'cnncli[prepare]'" in _help(["data", "prepare"])


def test_every_command_sits_in_a_panel_in_order():
    for name, command in ROOT.commands.items():
        assert command.rich_help_panel in PANELS, f"`cnncli {name}` has no help panel (one of {PANELS})"
    rendered = _help([])
    positions = [rendered.index(f" {panel} ") for panel in PANELS]
    assert positions == sorted(positions)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_option_names_agree(path, command):
    names = {opt for option in _options(command) for opt in option.opts}
    where = f"cnncli {' '.join(path)}"
    assert "--batch" not in names, f"{where}: the batch option is --batch-size"
    if "--set" in names:
        assert "-s" in names, f"{where}: --set has the short form -s everywhere"
    for option in _options(command):
        if "--out" in option.opts:
            # --out is a folder of figures or one file; runs are written to --run-dir
            assert re.match(r"(Folder|PNG|File)", option.help), f"{where} --out: {option.help}"
            assert "run" not in option.help.split()[:3], f"{where}: a run directory is --run-dir"


@pytest.mark.parametrize("command", ["train", "fine-tune"])
def test_train_and_fine_tune_have_the_common_shortcuts(command):
    rendered = _help([command])
    for option in ("--epochs", "--data", "--lr", "--batch-size", "--set", "--run-dir"):
        assert f" {option} " in rendered


def test_unknown_option_names_the_recipe_key():
    result = cli("train", "lenet5_fashion_mnist", "--weight-decay", "0.1")
    assert result.exit_code == 2
    assert "No such option: --weight-decay" in result.output
    assert "--set optim.weight_decay=VALUE" in _flat(result.output)
    result = cli("summary", "lenet5_fashion_mnist", "--frobnicate", "1")
    assert result.exit_code == 2
    assert "--set KEY=VALUE" in _flat(result.output)
    # a command without recipes gets no recipe hint
    result = cli("models", "--epochs", "3")
    assert result.exit_code == 2 and "--set" not in result.output


def test_shell_completion_is_offered_and_completes():
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    rendered = _help([])
    assert "--install-completion" in rendered and "--show-completion" in rendered
    # what bash asks when the user types `cnncli tr<TAB>`
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMP_WORDS": "cnncli tr", "COMP_CWORD": "1",
           "_CNNCLI_COMPLETE": "complete_bash"}
    code = "import sys; sys.argv = ['cnncli']; from cnncli.cli import app; app(prog_name='cnncli')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["train"], done
