"""How well a trained run's probabilities are calibrated, and temperature scaling to fix it.

`cnncli eval --calibration` reports the expected calibration error of a split and draws its
reliability diagram; `--temperature` fits one temperature on the run's validation split (Guo et al.
2017), stores it in the run (`calibration.json`, per checkpoint and weights) and reports the split
before and after. `cnncli predict` then divides its logits by that temperature. The maths is in
`cnncli.train.metrics`.
"""

from pathlib import Path
from typing import Any

import numpy as np

from cnncli.errors import UserError
from cnncli.inspect import figures
from cnncli.inspect.interpret import load_model, logits
from cnncli.train.metrics import calibration, expected_calibration_error, fit_temperature, nll, softmax
from cnncli.train.trained_run import eval_data


def fit_and_store(trained, *, batch_size: int, progress=None) -> dict[str, Any]:
    """Fit the temperature on the run's validation split, store it in the run, and return what was stored."""
    if not trained.data.get("n_val", 1):
        raise UserError(f"{trained.run.path} has no validation split to fit a temperature on "
                        "(it was trained with data.val_fraction=0)")
    x, y, _ = eval_data(trained, "val")
    z = logits(load_model(trained), x, batch_size=batch_size, progress=progress)
    t = fit_temperature(z, y)
    entry = {"temperature": t, "fitted_on": "val", "n": int(len(y)),
             "nll_before": nll(z, y), "nll_after": nll(z, y, t),
             "ece_before": expected_calibration_error(softmax(z), y),
             "ece_after": expected_calibration_error(softmax(z, t), y)}
    trained.store_temperature(entry)
    return entry


def calibrate(trained, x: np.ndarray, y: np.ndarray, *, split: str, out_dir: Path, fit: bool = False,
              tta: bool = False, batch_size: int = 1000, progress=None) -> dict[str, Any]:
    """Calibration of the run on images `x`, labels `y`: raw, and with the run's temperature if it has one.

    With `fit`, first fits and stores the temperature on the validation split. Writes the reliability
    diagram to out_dir/reliability_{split}.png. Returns {"raw": ..., "scaled": ... (with a temperature),
    "fit": ... (with `fit`), "figure": path} with `train.metrics.calibration` results.
    """
    if fit and tta:
        raise UserError("--temperature fits the temperature of the plain model, which `cnncli predict` uses; "
                        "leave out --tta")
    result: dict[str, Any] = {}
    if fit:
        result["fit"] = fit_and_store(trained, batch_size=batch_size)
    z = logits(load_model(trained), x, tta=tta, batch_size=batch_size, progress=progress)
    result["raw"] = calibration(z, y)
    temperature = trained.temperature
    panels = [("raw" + (" (flip TTA)" if tta else ""), result["raw"])]
    if temperature != 1.0 and not tta:
        result["scaled"] = calibration(z, y, temperature)
        panels.append((f"temperature {temperature:.3f} (fitted on val)", result["scaled"]))
    title = f"reliability on {split}: {len(y):,} images, {result['raw']['bins']} equal-width bins"
    result["figure"] = str(figures.save(figures.reliability(panels, title), Path(out_dir) / f"reliability_{split}.png"))
    return result
