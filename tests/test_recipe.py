"""Recipes: validation errors name the key and the closest valid one; --set overrides are type-checked."""

import pytest

from cnncli import recipe as recipe_lib
from cnncli.errors import UserError
from tests.helpers import cli

MINIMAL = "name: t\nmodel: {name: lenet5}\n"


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        recipe_lib.load(write(tmp_path, text), list(overrides))
    return str(e.value)


def test_defaults_and_overrides(tmp_path):
    r = recipe_lib.load(write(tmp_path, MINIMAL), ["optim.lr=0.05", "train.epochs=3", "data.image_size=[32, 32]",
                                                     "model.args.hidden=[64]"])
    assert r.optim.lr == 0.05 and r.train.epochs == 3 and r.data.image_size == (32, 32)
    assert r.model.args == {"hidden": [64]}
    assert r.data.source == "fashion_mnist" and r.optim.name == "sgd"


def test_unknown_key_names_path_and_suggestion(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "optim: {learning_rate: 0.1}\n")
    assert "unknown key 'optim.learning_rate'" in msg
    msg = error_of(tmp_path, MINIMAL + "train: {epoch: 3}\n")
    assert "'train.epoch'" in msg and "did you mean: epochs" in msg


def test_unknown_top_level_section(tmp_path):
    assert "did you mean: augment" in error_of(tmp_path, MINIMAL + "augmnt: []\n")


def test_wrong_type_and_negative_lr(tmp_path):
    assert "key 'train.epochs'" in error_of(tmp_path, MINIMAL + "train: {epochs: many}\n")
    msg = error_of(tmp_path, MINIMAL, "optim.lr=-0.1")
    assert "key 'optim.lr'" in msg and "greater than 0" in msg


def test_not_yaml_and_not_a_mapping(tmp_path):
    assert "is not valid YAML" in error_of(tmp_path, "name: [unclosed\n")
    assert "is not a recipe" in error_of(tmp_path, "- just\n- a list\n")


def test_bad_override_syntax(tmp_path):
    assert "--set expects KEY=VALUE" in error_of(tmp_path, MINIMAL, "optim.lr")


def test_missing_recipe_suggests_bundled(tmp_path):
    with pytest.raises(UserError, match="did you mean: lenet5_fashion_mnist"):
        recipe_lib.load("lenet5_fashion_mnst")


def test_every_bundled_recipe_validates():
    paths = recipe_lib.bundled_recipes()
    assert paths
    for path in paths:
        assert path.read_text().startswith("# cnncli "), f"{path.name} lacks its header command"
        if "finetune:" in path.read_text():  # its model comes from a source run: tests/test_finetune.py
            continue
        if "gan" in recipe_lib.read_yaml(path):  # `cnncli gan train` recipes: tests/test_gan.py trains one
            from cnncli.generative.recipe import load as load_gan_recipe

            assert load_gan_recipe(path).name == path.stem
            continue
        assert recipe_lib.load(path).name == path.stem


@pytest.mark.parametrize("override, expected", [
    ("model.name=lenet6", "unknown model 'lenet6' (did you mean: lenet5"),
    ("optim.name=adamm", "unknown optimizer 'adamm' (did you mean: adam"),
    ("data.source=fashion_mnst", "unknown dataset 'fashion_mnst' (did you mean: fashion_mnist?)"),
    ("schedule.name=cosin", "unknown schedule 'cosin' (did you mean: cosine"),
    ("model.args.widht=3", "model 'lenet5' has no option 'widht'"),
])
def test_unknown_names_through_the_cli(tmp_path, override, expected):
    result = cli("train", write(tmp_path, MINIMAL + "data: {source: synthetic}\n"), "--set", override, "--dry-run")
    assert result.exit_code == 2
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["../notes", "../../x", "/tmp/abs", "a/b", "a\\\\b", "..", ".hidden", "a..b", "~"])
def test_recipe_names_are_plain_names(tmp_path, name):
    # the name is the default run directory: a path would write (and --overwrite delete) outside runs/
    assert "is a plain name" in error_of(tmp_path, f"name: '{name}'\nmodel: {{name: lenet5}}\n")
    result = cli("train", write(tmp_path, MINIMAL + "data: {source: synthetic}\n"), "--set", f"name={name}",
                 "--set", "train.epochs=1")
    assert result.exit_code == 2 and f"--set name={name}: key 'name'" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


def test_plain_names_and_a_file_stem_that_is_not_one(tmp_path):
    assert recipe_lib.load(write(tmp_path, "name: resnet20-v2.1+aug_x\nmodel: {name: lenet5}\n")).name == \
        "resnet20-v2.1+aug_x"
    spaced = tmp_path / "my run (2).yaml"
    spaced.write_text("model: {name: lenet5}\n")
    assert recipe_lib.load(spaced).name == "my_run_2_"


def test_an_override_error_names_the_set_not_the_file(tmp_path):
    msg = error_of(tmp_path, MINIMAL, "optim.lr=0.1", "train.epochs=many")
    assert msg.startswith("--set train.epochs=many: key 'train.epochs'")
    msg = error_of(tmp_path, MINIMAL, "data.image_size=[1, 2, 3]")
    assert msg.startswith("--set data.image_size=[1, 2, 3]: key 'data.image_size")
    # a mistake in the file itself still names the file
    msg = error_of(tmp_path, MINIMAL + "train: {epochs: many}\n", "optim.lr=0.1")
    assert msg.startswith(f"{tmp_path / 'r.yaml'}: key 'train.epochs'")


@pytest.mark.parametrize("given,expected", [("28", (28, 28)), ("28x28", (28, 28)), ("[28, 28]", (28, 28)),
                                            ("32x24", (32, 24)), ("'64 x 48'", (64, 48))])
def test_image_size_forms(tmp_path, given, expected):
    assert recipe_lib.load(write(tmp_path, MINIMAL), [f"data.image_size={given}"]).data.image_size == expected
    text = MINIMAL + f"data: {{image_size: {given}}}\n"
    assert recipe_lib.load(write(tmp_path, text)).data.image_size == expected


def test_image_size_mistakes(tmp_path):
    assert "expected [H, W], HxW or one number" in error_of(tmp_path, MINIMAL, "data.image_size=28x")
    assert "key 'data.image_size'" in error_of(tmp_path, MINIMAL, "data.image_size=[1, 2, 3]")
