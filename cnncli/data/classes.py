"""Classes matched by name: where a trained run meets other data, label i must mean the run's class i.

Two sources of the same classes rarely agree on their order (a folder's sub-folders sort by name, a
dataset lists them in its own order), so positions mean nothing across sources; names do. Names are
compared normalized (case, and `_`, `-`, `/` and spaces alike), an explicit class map overrides the
matching, and a source without names ("0", "1", ...) is taken in the run's order only when the class
counts agree, which is said.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncli.errors import UserError, suggest

DROP = "-"  # `--class-map NAME=-` leaves that class's images out
ANY = "*"  # `--class-map '*=-'` leaves out every class the run does not know
SHOWN = 12  # class names listed in an error before '...'


def normalize(name: str) -> str:
    """'T-shirt/top' and 't_shirt top' -> 't shirt top': case, '_', '-', '/' (not allowed in a folder name)
    and runs of spaces do not tell classes apart."""
    return " ".join(re.split(r"[\s_\-/\\]+", str(name).strip().casefold())).strip()


def _listing(names) -> str:
    names = list(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def unnamed(names: list[str]) -> bool:
    """Whether `names` are only numbers, what a source gives classes it has no names for: '0', '1', ...,
    'class0', 'class1', ... or 'class_000', ..."""
    parts = [re.fullmatch(r"(\D*?)(\d+)", str(n)) for n in names]
    return (bool(names) and all(parts) and len({p.group(1) for p in parts}) == 1
            and [int(p.group(2)) for p in parts] == list(range(len(names))))


def parse_class_map(text: str | None) -> dict[str, str]:
    """`--class-map`: 'tshirt=T-shirt/top,sandals=Sandal,other=-', or a YAML/JSON file of such a mapping."""
    if not text:
        return {}
    path = Path(text).expanduser()
    if path.is_file():
        from cnncli.recipe import read_yaml_file

        raw = read_yaml_file(path, f"--class-map {path}")
        if not isinstance(raw, dict):
            raise UserError(f"--class-map {path} must map data class names to run class names (or '-' to drop), "
                            f"e.g. {json.dumps({'tshirt': 'T-shirt/top', 'other': DROP})}")
        return {str(k): DROP if v is None else str(v) for k, v in raw.items()}
    mapping = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--class-map expects DATA_CLASS=RUN_CLASS pairs separated by commas (RUN_CLASS '-' "
                            f"drops that class), or a YAML file of them; got '{pair}'")
        mapping[key.strip()] = value.strip()
    return mapping


@dataclass(frozen=True)
class ClassMatch:
    """For each class of the data, the run's class index (None: its images are left out)."""

    targets: list[int | None]
    note: str | None = None  # what the user should know about the matching (printed on stderr)

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images whose class the run knows, labelled with the run's indices."""
        lookup = np.array([-1 if t is None else t for t in self.targets], np.int64)
        labels = lookup[np.asarray(y, np.int64)]
        keep = labels >= 0
        return x[keep], labels[keep].astype(np.int32)


def match_classes(data_names: list[str], run_names: list[str], class_map: dict[str, str] | None = None, *,
                  data: str = "the data") -> ClassMatch:
    """Map every class of `data_names` to its class among `run_names`, by normalized name.

    Args:
        data_names: The other source's class names, in its label order.
        run_names: The trained run's class names, in its label order.
        class_map: Data class name -> run class name (or DROP) that overrides the matching; the key ANY
            (with DROP) leaves out every data class the run lacks.
        data: The source, for messages.

    Raises:
        UserError: A data class the run does not know, or a class map naming a class that does not exist;
            the message lists both sides.
    """
    class_map = dict(class_map or {})
    drop_unknown = class_map.pop(ANY, None)
    if drop_unknown not in (None, DROP):
        raise UserError(f"--class-map '{ANY}' only takes '{DROP}' ('{ANY}={DROP}': leave out every class the run "
                        f"does not know), got '{ANY}={drop_unknown}'")
    run_index = {}
    for i, name in enumerate(run_names):
        run_index.setdefault(normalize(name), i)
    data_index = {normalize(n): n for n in data_names}
    for key, value in class_map.items():
        if normalize(key) not in data_index:
            raise UserError(f"--class-map names '{key}', which is not a class of {data}{suggest(key, data_names)}; "
                            f"its classes: {_listing(data_names)}")
        if value != DROP and normalize(value) not in run_index:
            raise UserError(f"--class-map maps '{key}' to '{value}', which is not a class of the run"
                            f"{suggest(value, run_names)}; the run's classes: {_listing(run_names)}")
    mapped = {normalize(k): v for k, v in class_map.items()}

    if not class_map and unnamed(data_names) and not unnamed(run_names):
        if len(data_names) != len(run_names):
            raise UserError(f"{data} has {len(data_names)} unnamed classes (0..{len(data_names) - 1}) and the run "
                            f"{len(run_names)} ({_listing(run_names)}); say which is which with --class-map, e.g. "
                            f"--class-map '0={run_names[0]},1={run_names[1]}'")
        return ClassMatch(list(range(len(run_names))),
                          note=f"{data} has no class names: its labels 0..{len(run_names) - 1} are taken as the run's "
                               f"classes in order ({_listing(run_names)}); --class-map maps them otherwise")

    targets, unknown = [], []
    for name in data_names:
        wanted = mapped.get(normalize(name), name)
        if wanted == DROP:
            targets.append(None)
        elif normalize(wanted) in run_index:
            targets.append(run_index[normalize(wanted)])
        elif drop_unknown:
            targets.append(None)
        else:
            targets.append(None)
            unknown.append(name)
    if unknown:
        raise UserError(f"{data} has classes the run was not trained on: {_listing(unknown)}; the run's classes: "
                        f"{_listing(run_names)}. Map them with --class-map 'DATA=RUN,...' (RUN '{DROP}' leaves a "
                        f"class out; '{ANY}={DROP}' leaves out every unknown class)")
    seen = [t for t in targets if t is not None]
    if not seen:
        raise UserError(f"no class of {data} is left to evaluate: --class-map leaves every one out")
    twice = sorted({run_names[t] for t in seen if seen.count(t) > 1})
    note = None
    if twice:
        note = f"several classes of {data} count as the run's {', '.join(twice)}"
    return ClassMatch(targets, note=note)


def find_classes(names: list[str], known: list[str]) -> list[int] | None:
    """The index in `known` of each of `names` (by normalized name), or None when one of them is not there.

    Numbered names ('0', 'class1', ...) say nothing about what a class is: they match only the same list.
    """
    if list(names) == list(known):
        return list(range(len(known)))
    if unnamed(names) or unnamed(known):
        return None
    index = {}
    for i, name in enumerate(known):
        index.setdefault(normalize(name), i)
    found = [index.get(normalize(name)) for name in names]
    if None in found or len(set(found)) != len(found):
        return None
    return found
