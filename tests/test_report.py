"""The evaluation report (precision/recall/F1, most-confused pairs) and calibration (ECE, temperature scaling),
checked against scikit-learn, torchmetrics and NumPy on real predictions of the shared LeNet-5 run."""

import json
import shutil

import numpy as np
import pytest
from helpers import cli
from sklearn.metrics import classification_report as sk_report
from sklearn.metrics import confusion_matrix as sk_confusion

from cnncli.inspect import interpret
from cnncli.train import metrics


@pytest.fixture(scope="module")
def predictions(lenet_run):
    """(raw logits, labels, class names) of the shared run on its whole test split, via the predict path."""
    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(lenet_run)
    x, y, names = eval_data(trained, "test")
    return interpret.logits(interpret.load_model(trained), x), y, names


@pytest.fixture(scope="module")
def eval_json(lenet_run):
    result = cli("eval", lenet_run, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _sklearn(y, pred, names):
    present = sorted(set(y) | set(pred))
    return sk_report(y, pred, labels=present, target_names=[names[i] for i in present], output_dict=True,
                     zero_division=0)


@pytest.mark.slow
def test_eval_report_matches_sklearn_on_real_predictions(eval_json, predictions):
    logits, y, names = predictions
    pred = logits.argmax(-1)
    # the eval step's confusion matrix and the predict path's argmax agree
    assert eval_json["confusion"] == sk_confusion(y, pred, labels=range(len(names))).tolist()
    ref, report = _sklearn(y, pred, names), eval_json["report"]
    for row in report["classes"]:
        for key in ("precision", "recall", "f1-score"):
            assert row[key.removesuffix("-score")] == pytest.approx(ref[row["class"]][key], abs=1e-12)
        assert row["support"] == ref[row["class"]]["support"]
    for ours, theirs in (("macro", "macro avg"), ("weighted", "weighted avg")):
        for key in ("precision", "recall", "f1-score"):
            assert report[ours][key.removesuffix("-score")] == pytest.approx(ref[theirs][key], abs=1e-12)
    assert report["accuracy"] == pytest.approx(ref["accuracy"]) == pytest.approx(eval_json["top1"])


def test_report_on_a_subset_of_classes_averages_over_the_classes_present():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(6)]
    y = rng.choice([0, 2, 3], size=400)  # classes 1, 4 and 5 absent from the labels
    pred = np.where(rng.random(400) < 0.7, y, rng.choice([0, 1, 2, 3], size=400))  # 1 predicted, never true
    report = metrics.classification_report(sk_confusion(y, pred, labels=range(6)), names)
    ref = _sklearn(y, pred, names)
    assert [r["precision"] for r in report["classes"]][4:] == [None, None]
    assert report["classes"][1]["recall"] == 0.0 and report["classes"][1]["support"] == 0
    for ours, theirs in (("macro", "macro avg"), ("weighted", "weighted avg")):
        for key in ("precision", "recall", "f1-score"):
            assert report[ours][key.removesuffix("-score")] == pytest.approx(ref[theirs][key], abs=1e-12)


@pytest.mark.slow
def test_most_confused_pairs_are_the_largest_off_diagonal_cells(eval_json):
    confusion = np.array(eval_json["confusion"])
    names = eval_json["class_names"]
    cells = sorted(((confusion[t, p], t, p) for t in range(len(names)) for p in range(len(names)) if t != p),
                   key=lambda c: (-c[0], c[1], c[2]))
    expected = [(names[t], names[p], int(n), round(n / confusion[t].sum(), 12))
                for n, t, p in cells[:metrics.CONFUSED_PAIRS]]
    got = [(c["true"], c["predicted"], c["count"], round(c["share"], 12)) for c in eval_json["most_confused"]]
    assert got == expected
    assert metrics.confused_pairs(np.diag([5, 7]), ["a", "b"]) == []  # no mistake, no pair


def test_eval_table_shows_precision_recall_f1_and_confused_pairs(lenet_run, eval_json):
    result = cli("eval", lenet_run)
    assert result.exit_code == 0, result.output
    macro = eval_json["report"]["macro"]
    assert f"{macro['f1']:.4f}" in result.stdout and "weighted avg" in result.stdout
    top = eval_json["most_confused"][0]
    assert "most confused" in result.stdout and top["true"] in result.stdout


# ----------------------------------------------------------------------------- calibration


@pytest.mark.slow
def test_ece_matches_torchmetrics_on_real_probabilities(predictions):
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    logits, y, names = predictions
    probs = metrics.softmax(logits)
    confidence = probs.max(-1)
    # the two bin conventions ((a, b] here, [a, b) in torchmetrics) differ only for a confidence on an edge
    edges = np.linspace(0, 1, metrics.ECE_BINS + 1)
    assert not np.isin(confidence, edges).any()
    reference = MulticlassCalibrationError(num_classes=len(names), n_bins=metrics.ECE_BINS, norm="l1")
    expected = float(reference(torch.from_numpy(probs), torch.from_numpy(y.astype(np.int64))))
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(expected, abs=1e-6)  # torchmetrics: float32
    assert 0.0 < expected < 0.2


def test_ece_bins_on_their_edges_follow_guo_et_al():
    # confidences exactly on bin edges go to the bin they close: ((m-1)/M, m/M]
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.0, 1.0], [0.5, 0.5]])
    labels = np.array([1, 1, 1, 0])
    bins = 5
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    ece = 0.0
    for m in range(1, bins + 1):  # a direct transcription of the paper's definition
        inside = (conf > (m - 1) / bins) & (conf <= m / bins)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert metrics.expected_calibration_error(probs, labels, bins) == pytest.approx(ece, abs=1e-12)


@pytest.mark.slow
def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    calibrated = rng.normal(size=(20000, 10)) * 2.0
    labels = np.array([rng.choice(10, p=p) for p in metrics.softmax(calibrated)])
    t = metrics.fit_temperature(3.0 * calibrated, labels)  # an over-confident model: logits 3x too large
    assert t == pytest.approx(3.0, rel=0.03)
    grid = np.linspace(2.5, 3.5, 2001)
    assert t == pytest.approx(grid[np.argmin([metrics.nll(3.0 * calibrated, labels, g) for g in grid])], abs=1e-3)


@pytest.mark.slow
def test_eval_temperature_stores_it_and_predict_uses_it(lenet_run, tmp_path, predictions):
    from PIL import Image

    from cnncli.train.trained_run import eval_data, load_trained

    run = tmp_path / "run"
    shutil.copytree(lenet_run, run)  # the shared run stays uncalibrated
    x, _, _ = eval_data(load_trained(run), "test")
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(x[i, ..., 0]).save(images[-1])
    before = json.loads(cli("predict", run, *images, "--json", "--top", "10").stdout)
    result = cli("eval", run, "--temperature", "--json")
    assert result.exit_code == 0, result.output
    cal = json.loads(result.stdout)["calibration"]
    t = cal["fit"]["temperature"]
    stored = json.loads((run / "calibration.json").read_text())
    assert [e["temperature"] for e in stored.values()] == [t] and t != 1.0
    assert cal["fit"]["nll_after"] <= cal["fit"]["nll_before"]
    assert cal["scaled"]["temperature"] == t and cal["raw"]["temperature"] == 1.0
    logits, y, _ = predictions
    assert cal["raw"]["ece"] == pytest.approx(metrics.expected_calibration_error(metrics.softmax(logits), y), abs=1e-6)
    assert (run / "plots" / "reliability_test.png").is_file()
    after = json.loads(cli("predict", run, *images, "--json", "--top", "10").stdout)
    for b, a in zip(before, after):
        raw = np.array([e["probability"] for e in sorted(b["top"], key=lambda e: e["index"])], np.float64)
        scaled = raw ** (1 / t) / np.sum(raw ** (1 / t))  # softmax(z / T) is proportional to softmax(z) ** (1 / T)
        got = np.array([e["probability"] for e in sorted(a["top"], key=lambda e: e["index"])])
        assert got == pytest.approx(scaled, abs=1e-5)
        assert [e["index"] for e in a["top"]] == [e["index"] for e in b["top"]]


@pytest.mark.slow
def test_temperature_needs_a_validation_split_and_no_tta(lenet_run, tmp_path):
    result = cli("eval", lenet_run, "--temperature", "--tta")
    assert result.exit_code == 2 and "leave out --tta" in result.stderr
    run = tmp_path / "run"
    shutil.copytree(lenet_run, run)
    data = json.loads((run / "data.json").read_text())
    (run / "data.json").write_text(json.dumps({**data, "n_val": 0}))
    result = cli("eval", run, "--temperature")
    assert result.exit_code == 2 and "no validation split" in result.stderr
    assert not (run / "calibration.json").exists()


# ----------------------------------------------------------------------------- visualize --normalize


@pytest.mark.slow
@pytest.mark.parametrize("normalize,axis", [("true", 1), ("pred", 0)])
def test_confusion_normalized_annotations_match_numpy(lenet_run, eval_json, normalize, axis):
    from cnncli.inspect.visualize import FIGURES, Job
    from cnncli.train.trained_run import load_trained

    trained = load_trained(lenet_run)
    model = interpret.load_model(trained)
    fig, name = FIGURES["confusion"](Job(trained, model, {}, None, None, None, "test", None, 1000, normalize))
    assert name == f"confusion_test_{normalize}"
    counts = np.array(eval_json["confusion"], np.float64)
    expected = counts / np.maximum(counts.sum(axis=axis, keepdims=True), 1)
    shown = np.array([float(t.get_text()) for t in fig.axes[0].texts]).reshape(counts.shape)
    assert shown == pytest.approx(expected, abs=0.005 + 1e-9)  # annotations have two decimals


def test_normalize_errors_are_one_line(lenet_run):
    for args in (["--what", "filters", "--normalize", "true"], ["--what", "confusion", "--normalize", "rows"]):
        result = cli("visualize", lenet_run, *args)
        assert result.exit_code == 2 and "--normalize" in result.stderr
