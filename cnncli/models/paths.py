"""Submodules addressed by path: tuples of attribute names and list indices, as in `nnx.iter_modules`."""

from flax import nnx


def module_at(root: nnx.Module, path: tuple) -> nnx.Module:
    """The submodule at a path of attribute names and list indices."""
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def set_module_at(root: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = module_at(root, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def module_path(dotted: str) -> tuple:
    """'features.3.conv' -> ('features', 3, 'conv')."""
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
