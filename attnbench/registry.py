"""The mechanism registry: one decorator to register, one factory to build.

Every mechanism, built-in or third-party, is found through the ``attnbench.mechanisms``
entry-point group: the built-in ones in ``mechanisms/`` are declared in attnbench's own
``pyproject.toml`` exactly as a plug-in package declares its own, so the engine never imports
them by name and the plug-in path runs on every call.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from importlib import metadata

from torch import nn

ENTRY_POINT_GROUP = "attnbench.mechanisms"

_REGISTRY: dict[str, type] = {}
_BROKEN_PLUGINS: dict[str, str] = {}  # entry-point name -> why it failed to load
_loaded = False


class UnknownMechanismError(KeyError):
    """A mechanism name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_mechanism(cls: type) -> type:
    """Class decorator: add a ``Mechanism`` subclass to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    old = _REGISTRY.get(name)
    same_source = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not same_source:
        raise ValueError(f"mechanism {name!r} is registered twice: "
                         f"{_REGISTRY[name].__module__} and {cls.__module__}")
    _REGISTRY[name] = cls
    return cls


def load_entry_points(group: str, broken: dict[str, str]) -> None:
    """Load every entry point of ``group`` (loading a module runs its ``@register_…``
    decorators); one that fails is recorded in ``broken`` and warned about, not raised."""
    for ep in metadata.entry_points(group=group):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not take attnbench down
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"attnbench plug-in {ep.name!r} ({ep.value}) failed to load: {exc}",
                          stacklevel=3)


def _load_all() -> None:
    """Load every mechanism of the entry-point group, built-in and plug-in alike, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_entry_points(ENTRY_POINT_GROUP, _BROKEN_PLUGINS)


NOT_INSTALLED = ("none registered: attnbench's entry points are not installed; run "
                 "`pip install -e .` in the checkout (scripts/setup.sh does)")


def load_module(spec: str) -> None:
    """Import extra mechanisms from a module name or a ``.py`` file path (``--load``)."""
    import importlib.util
    from pathlib import Path

    path = Path(spec)
    if spec.endswith(".py") and not path.is_file():
        raise UnknownMechanismError(f"--load {spec}: no such file")
    try:
        if spec.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except Exception as exc:  # the module's own mistake: one line saying where, not a traceback
        raise UnknownMechanismError(f"--load {spec}: cannot import it: {_where(exc)}") from None


def _where(exc: BaseException) -> str:
    """``file.py:3: SyntaxError: invalid syntax``: the line an import failed at, and why."""
    import traceback

    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
    if isinstance(exc, ImportError):  # a missing module: its name says it all
        return f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    place = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{place}{type(exc).__name__}: {exc}"


def reload_plugins() -> None:
    """Forget what was loaded and discover again (for tests that install a plug-in)."""
    global _loaded
    _loaded = False
    _BROKEN_PLUGINS.clear()
    _load_all()


def mechanism_names() -> list[str]:
    """Every registered mechanism name, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def broken_plugins() -> dict[str, str]:
    """Plug-ins that failed to load, with the reason."""
    _load_all()
    return dict(_BROKEN_PLUGINS)


def get_mechanism(name: str) -> type:
    """The registered class for ``name``; an unknown name lists the valid ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMechanismError(
            f"unknown mechanism {name!r}; valid choices: {', '.join(sorted(_REGISTRY)) or NOT_INSTALLED}"
        ) from None


def build_mechanism(name: str, dim: int, num_heads: int, **options: typing.Any) -> nn.Module:
    """Build the token mixer ``name`` for ``dim`` channels split over ``num_heads`` heads.

    ``options`` are the mechanism's own (its ``Options`` dataclass); unknown or out-of-range
    options raise ``OptionError`` naming the valid ones.
    """
    cls = get_mechanism(name)
    return cls(dim, num_heads, cls.make_options(**options))


class OptionError(ValueError):
    """A mechanism option that is unknown, of the wrong type or out of range."""


def make_options(options_cls: type, name: str, **values: typing.Any):
    """Instantiate an options dataclass, with clear errors for unknown names and bad strings.

    String values (from the command line) are converted to the field's declared type.
    """
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise OptionError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    hints = typing.get_type_hints(options_cls)
    converted = {k: _convert(name, k, v, hints[k]) for k, v in values.items()}
    check_ranges(options_cls, name, converted)
    return options_cls(**converted)


def check_ranges(options_cls: type, name: str, values: typing.Mapping[str, typing.Any]) -> None:
    """Every value whose field declares a range (``attnbench.mechanism.option``) is a number in it:
    ``OptionError`` with one line naming the option, the value and the range."""
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        valid = f.metadata.get("range")
        if valid is None or f.name not in values:
            continue
        problem = valid.check(values[f.name], integer=_base(hints[f.name]) is int)
        if problem:
            raise OptionError(f"{name}.{f.name}={values[f.name]!r} {problem}")


def _base(hint: typing.Any) -> typing.Any:
    """``int`` of ``int | None``; the hint itself otherwise."""
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint) if args else hint


def _convert(mech: str, key: str, value: typing.Any, hint: typing.Any) -> typing.Any:
    """Turn a command-line string into the field's type; leave other values alone."""
    if not isinstance(value, str):
        return value
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise OptionError(f"{mech}.{key}={value!r}; valid choices: {', '.join(map(str, args))}")
        return value
    optional = type(None) in args
    base = _base(hint)
    if optional and value.lower() in ("none", ""):
        return None
    try:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float):
            return base(value)
    except ValueError:
        raise OptionError(f"{mech}.{key}={value!r} is not a valid {base.__name__}") from None
    return value
