"""Build recipes: a detector described as data, so that one description both builds it and prints as Python.

:func:`samkd.models.build_detector` builds a model by running its family's :class:`Recipe`; the exporter writes
the very same recipe out as Python source (plain torchvision calls, importable by path). What an export rebuilds
is therefore what was trained, by construction, not by keeping two pieces of code in step.

A recipe is a list of named steps, ``name = Call(...)``; a :class:`Var` names an earlier step's value, a
:class:`Ref` a class or function passed as a value (``norm_layer=FrozenBatchNorm2d``). The last step is the
result.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def _split(path: str) -> tuple[str, str]:
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"import path {path!r}: expected 'module.path:Name'")
    return module, name


def _resolve(path: str) -> Any:
    module, name = _split(path)
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Ref:
    """A class or function by import path (``"torch.nn:GroupNorm"``), used as a value."""

    path: str


@dataclass(frozen=True)
class Var:
    """The value of an earlier step of the recipe."""

    name: str


@dataclass(frozen=True)
class Call:
    """``fn(*args, **kwargs)`` with ``fn`` an import path; arguments may nest Calls, Refs, Vars and containers."""

    fn: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class Recipe:
    """Named steps, run in order (:meth:`build`) or written as Python (:meth:`code`); the last step is the result."""

    def __init__(self, steps: list[tuple[str, Call]]):
        if not steps:
            raise ValueError("a recipe needs at least one step")
        self.steps = list(steps)

    @property
    def result(self) -> str:
        return self.steps[-1][0]

    def build(self) -> Any:
        env: dict[str, Any] = {}
        for name, call in self.steps:
            env[name] = _evaluate(call, env)
        return env[self.result]

    def code(self) -> str:
        """Python source that runs the recipe: its imports, then one ``name = ...`` line per step."""
        imports: dict[str, str] = {}
        lines = [f"{name} = {_render(call, imports)}" for name, call in self.steps]
        header = [f"from {module} import {name}" for name, module in sorted(imports.items(), key=lambda x: x[::-1])]
        return "\n".join(header + lines) + "\n"


def _evaluate(value: Any, env: dict) -> Any:
    if isinstance(value, Call):
        return _resolve(value.fn)(*(_evaluate(a, env) for a in value.args),
                                  **{k: _evaluate(v, env) for k, v in value.kwargs.items()})
    if isinstance(value, Ref):
        return _resolve(value.path)
    if isinstance(value, Var):
        return env[value.name]
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _evaluate(v, env) for k, v in value.items()}
    return value


def _import(path: str, imports: dict[str, str]) -> str:
    module, name = _split(path)
    if imports.setdefault(name, module) != module:
        raise ValueError(f"recipe imports two objects named {name}: from {imports[name]} and from {module}")
    return name


def _render(value: Any, imports: dict[str, str]) -> str:
    if isinstance(value, Call):
        args = [_render(a, imports) for a in value.args]
        args += [f"{k}={_render(v, imports)}" for k, v in value.kwargs.items()]
        return f"{_import(value.fn, imports)}({', '.join(args)})"
    if isinstance(value, Ref):
        return _import(value.path, imports)
    if isinstance(value, Var):
        return value.name
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, imports) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_render(v, imports) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_render(v, imports)}" for k, v in value.items()) + "}"
    return repr(value)
