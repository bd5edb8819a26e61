"""Nested state dicts (as `nnx.to_pure_dict` gives them) as flat {path tuple: leaf} dicts and back."""

from typing import Any


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """{'net': {'fc': {'kernel': k}}} -> {('net', 'fc', 'kernel'): k}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def unflatten(flat: dict[tuple, Any]) -> dict:
    """The inverse of `flatten`."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
