"""Classes are matched by name wherever a trained run meets other data (eval, adversarial, visualize
--data, and fine-tune's head): folders in another order, a subset of the classes, unknown classes."""

import json

import numpy as np
import pytest
from PIL import Image

from cnncli.data.classes import ClassMatch, match_classes, normalize, parse_class_map, unnamed
from cnncli.errors import UserError
from cnncli.inspect.interpret import load_model, probabilities
from cnncli.train.trained_run import eval_data, load_trained
from tests.helpers import cli

PER_CLASS = 12
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ----------------------------------------------------------------------------- the matching itself


def test_normalized_names():
    assert normalize("T-shirt/top") == normalize("t_shirt top") == normalize(" T-SHIRT__TOP") == "t shirt top"
    assert normalize("Ankle boot") == normalize("ankle-boot") != normalize("ankleboot")


def test_shuffled_order_and_subset_map_by_name():
    data = ["sneaker", "bag", "ankle_boot", "T-shirt-top"]  # a folder's sorted sub-folders
    match = match_classes(data, FASHION)
    assert match.targets == [7, 8, 9, 0] and match.note is None
    x = np.arange(8)[:, None]
    y = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    kept_x, kept_y = match.apply(x, y)
    assert kept_x.ravel().tolist() == list(range(8)) and kept_y.tolist() == [7, 8, 9, 0, 0, 9, 8, 7]


def test_unknown_class_lists_both_sides():
    with pytest.raises(UserError) as e:
        match_classes(["Bag", "Hat", "Scarf"], FASHION, data="data 'folder:x'")
    msg = str(e.value)
    assert msg.startswith("data 'folder:x' has classes the run was not trained on: Hat, Scarf; the run's classes: "
                          "T-shirt/top, Trouser, Pullover,")
    assert "Ankle boot" in msg and "--class-map" in msg


def test_class_map_renames_drops_and_overrides(tmp_path):
    assert parse_class_map("tshirt=T-shirt/top, hat=-") == {"tshirt": "T-shirt/top", "hat": "-"}
    match = match_classes(["tshirt", "hat", "bag"], FASHION, parse_class_map("tshirt=T-shirt/top,hat=-"))
    assert match.targets == [0, None, 8]
    # '*=-' leaves out every class the run does not know
    assert match_classes(["hat", "Bag", "scarf"], FASHION, {"*": "-"}).targets == [None, 8, None]
    # an explicit map wins over a name that would match
    assert match_classes(["Bag", "Shirt"], FASHION, {"Bag": "Shirt", "Shirt": "Bag"}).targets == [6, 8]
    mapping = tmp_path / "map.yaml"
    mapping.write_text("tshirt: T-shirt/top\nhat: null\n")
    assert parse_class_map(str(mapping)) == {"tshirt": "T-shirt/top", "hat": "-"}
    for bad, expected in [({"Hat": "Bag"}, "names 'Hat', which is not a class of the data"),
                          ({"Bag": "Handbag"}, "maps 'Bag' to 'Handbag', which is not a class of the run"),
                          ({"Bag": "-"}, "no class of the data is left")]:
        with pytest.raises(UserError, match=expected):
            match_classes(["Bag"], FASHION, bad)
    with pytest.raises(UserError, match="--class-map expects DATA_CLASS=RUN_CLASS"):
        parse_class_map("tshirt")


def test_unnamed_data_follows_the_run_order_only_when_the_counts_agree():
    assert unnamed(["0", "1", "2"]) and unnamed(["class_00", "class_01"]) and not unnamed(["3", "5"])
    match = match_classes([str(i) for i in range(10)], FASHION, data="data 'idx:d'")
    assert match.targets == list(range(10)) and "has no class names" in match.note
    with pytest.raises(UserError, match="has 3 unnamed classes"):
        match_classes(["0", "1", "2"], FASHION)


def test_same_class_twice_is_said():
    match = match_classes(["sneakers", "trainers"], FASHION, {"sneakers": "Sneaker", "trainers": "Sneaker"})
    assert match == ClassMatch([7, 7], note="several classes of the data count as the run's Sneaker")


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def test_images(lenet_run):
    """PER_CLASS Fashion-MNIST test images of each class, with the trained model's own predictions."""
    trained = load_trained(lenet_run)
    x, y, names = eval_data(trained, "test")
    assert names == FASHION
    keep = np.concatenate([np.flatnonzero(y == k)[:PER_CLASS] for k in range(10)])
    predicted = probabilities(load_model(trained), x[keep]).argmax(axis=1)
    return x[keep], y[keep], predicted


def image_folder(root, x, y, classes, folder_name=lambda name: name.replace("/", "-")):
    """One sub-folder per class in `classes` (run indices), named after the class; sorted, their order differs."""
    for k in classes:
        folder = root / folder_name(FASHION[k])
        folder.mkdir(parents=True)
        for j in np.flatnonzero(y == k):
            Image.fromarray(x[j, ..., 0]).save(folder / f"{j}.png")
    return root


def eval_json(run, *args):
    result = cli("eval", run, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.mark.slow
def test_eval_on_a_folder_in_another_order_matches_classes_by_name(lenet_run, test_images, tmp_path):
    x, y, predicted = test_images
    root = image_folder(tmp_path / "all", x, y, range(10))
    assert sorted(p.name for p in root.iterdir())[:3] == ["Ankle boot", "Bag", "Coat"]  # not the run's order
    result, _ = eval_json(lenet_run, "--data", f"folder:{root}")
    assert result["split"] == "all" and result["n"] == len(y)  # a flat folder: every image
    assert result["top1"] == pytest.approx(np.mean(predicted == y), abs=1e-9)
    for k, row in enumerate(result["per_class"]):
        assert row["class"] == FASHION[k] and row["n"] == PER_CLASS
        assert row["accuracy"] == pytest.approx(np.mean(predicted[y == k] == k), abs=1e-9)


@pytest.mark.slow
def test_eval_on_a_subset_of_classes(lenet_run, test_images, tmp_path):
    x, y, predicted = test_images
    subset = [8, 5, 1]  # Bag, Sandal, Trouser
    root = image_folder(tmp_path / "three", x, y, subset, folder_name=lambda n: n.lower())
    result, _ = eval_json(lenet_run, "--data", f"folder:{root}")
    mine = np.isin(y, subset)
    assert result["n"] == mine.sum() == 3 * PER_CLASS
    assert result["top1"] == pytest.approx(np.mean(predicted[mine] == y[mine]), abs=1e-9)
    assert [row["n"] for row in result["per_class"]] == [PER_CLASS if k in subset else 0 for k in range(10)]


@pytest.mark.slow
def test_eval_on_a_folder_with_an_unknown_class(lenet_run, test_images, tmp_path):
    x, y, predicted = test_images
    root = image_folder(tmp_path / "unknown", x, y, [0, 7])
    (root / "Hat").mkdir()
    Image.fromarray(x[0, ..., 0]).save(root / "Hat" / "h.png")
    result = cli("eval", lenet_run, "--data", f"folder:{root}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "has classes the run was not trained on: Hat; the run's classes: T-shirt/top, Trouser" in message
    kept = np.isin(y, [0, 7])
    for class_map in ("Hat=-", "*=-"):
        evaluated, _ = eval_json(lenet_run, "--data", f"folder:{root}", "--class-map", class_map)
        assert evaluated["n"] == kept.sum()
        assert evaluated["top1"] == pytest.approx(np.mean(predicted[kept] == y[kept]), abs=1e-9)
    # the folder's Hat images counted as Sneakers, by an explicit map
    evaluated, _ = eval_json(lenet_run, "--data", f"folder:{root}", "--class-map", "hat=Sneaker")
    assert evaluated["per_class"][7]["n"] == PER_CLASS + 1


@pytest.mark.slow
def test_a_source_without_test_split_says_which_splits_it_has(lenet_run, test_images, tmp_path):
    x, y, _ = test_images
    root = image_folder(tmp_path / "flat", x, y, [1, 2])
    result = cli("eval", lenet_run, "--data", f"folder:{root}", "--split", "test")
    assert result.exit_code == 2
    assert f"the dataset 'folder:{root}' has no test split; it has train ({2 * PER_CLASS} images): choose one " \
           "with --split, or --split all for every image" in " ".join(result.stderr.split())
    train_split, _ = eval_json(lenet_run, "--data", f"folder:{root}", "--split", "train")
    assert train_split["n"] == 2 * PER_CLASS and train_split["split"] == "train"


@pytest.mark.slow
def test_adversarial_and_visualize_take_the_same_matching(lenet_run, test_images, tmp_path):
    x, y, predicted = test_images
    root = image_folder(tmp_path / "shuffled", x, y, range(10))
    result = cli("adversarial", lenet_run, "--data", f"folder:{root}", "--eps", "0", "--examples", "0",
                 "--out", tmp_path / "plots", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    assert row["n"] == len(y) and row["clean_accuracy"] == pytest.approx(np.mean(predicted == y), abs=1e-9)
    result = cli("visualize", lenet_run, "--what", "confusion", "--data", f"folder:{root}", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "confusion_all.png").is_file()
    (root / "Hat").mkdir()
    Image.fromarray(x[0, ..., 0]).save(root / "Hat" / "h.png")
    for command in (["adversarial", lenet_run, "--eps", "0"], ["visualize", lenet_run, "--what", "errors"]):
        result = cli(*command, "--data", f"folder:{root}", "--out", tmp_path)
        assert result.exit_code == 2 and "the run was not trained on: Hat" in " ".join(result.stderr.split())


def test_class_map_needs_another_source(lenet_run):
    result = cli("eval", lenet_run, "--class-map", "a=b")
    assert result.exit_code == 2 and "--class-map maps the classes of another source" in result.stderr


# ----------------------------------------------------------------------------- fine-tune's head


def prepared(source_run, data: str, tmp_path, *overrides):
    from flax import nnx

    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits
    from cnncli.transfer.finetune import prepare

    source = load_trained(source_run)
    path = tmp_path / "tune.yaml"
    path.write_text(f"name: tune\ndata: {{source: 'folder:{data}', val_fraction: 0}}\nfinetune: {{mode: head}}\n")
    recipe = recipe_lib.load(path, list(overrides), defaults={"model": source.recipe.model.model_dump(mode="json")})
    splits = load_splits(recipe.data, recipe.seed)
    tuning = prepare(source, recipe, splits)
    model = nnx.merge(tuning.model.eval_def, tuning.model.params, tuning.model.rest)
    return tuning, splits, lambda x: np.asarray(model(x.astype(np.float32) / 255))


@pytest.mark.slow
@pytest.mark.parametrize("classes", [list(range(10)), [5, 1, 8]], ids=["shuffled", "subset"])
def test_fine_tune_keeps_the_head_for_the_same_classes_by_name(lenet_run, test_images, tmp_path, classes):
    x, y, _ = test_images
    root = image_folder(tmp_path / "data", x, y, classes)
    tuning, splits, logits = prepared(lenet_run, root, tmp_path)
    source = load_model(load_trained(lenet_run))
    folders = [name.replace("/", "-") for name in FASHION]
    order = [folders.index(name) for name in splits.class_names]
    assert sorted(order) == sorted(classes) and order != classes  # the folder's order is not the run's
    assert not tuning.head_replaced and "matched by name" in " ".join(tuning.notes)
    reference = np.asarray(source(x[:20].astype(np.float32) / 255))[:, order]
    np.testing.assert_allclose(logits(x[:20]), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fine_tune_replaces_the_head_for_other_classes(lenet_run, test_images, tmp_path):
    x, y, _ = test_images
    root = image_folder(tmp_path / "data", x, y, [0, 1], folder_name=lambda n: f"not a {n.replace('/', '-')}")
    tuning, splits, _ = prepared(lenet_run, root, tmp_path)
    assert tuning.head_replaced and "not among the source's by name" in " ".join(tuning.notes)
