"""The registries: one class that keeps mechanisms and tasks alike, one decorator to register, one
factory to build.

Every mechanism and every task, built-in or third-party, is found through an entry-point group
(``attnbench.mechanisms``, ``attnbench.task``): the built-in ones in ``mechanisms/`` and ``tasks/``
are declared in attnbench's own ``pyproject.toml`` exactly as a plug-in package declares its own, so
the engine never imports them by name and the plug-in path runs on every call. ``load_module`` is
the other door (``--load``): a module or ``.py`` file imported on request.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import traceback
import typing
import warnings
from importlib import metadata
from pathlib import Path

from torch import nn

NOT_INSTALLED = ("none registered: attnbench's entry points are not installed; run "
                 "`pip install -e .` in the checkout (scripts/setup.sh does)")

T = typing.TypeVar("T", bound=type)


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownMechanismError(UnknownNameError):
    """A mechanism name that is not registered; the message lists the valid names."""


class LoadError(ValueError):
    """A ``--load`` module that is missing or fails to import; the message says where and why."""


class Registry(typing.Generic[T]):
    """Classes of one kind by their ``name`` attribute: one dict, one decorator (``register``), and
    the entry-point ``group`` loaded once, at the first look-up. A plug-in that fails to load is
    recorded with its reason and warned about, never raised: one broken package must not take
    attnbench down."""

    def __init__(self, kind: str, group: str, unknown: type[UnknownNameError] = UnknownNameError) -> None:
        self.kind, self.group, self.unknown = kind, group, unknown  # "mechanism", its group, its error
        self._classes: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why it failed to load
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name``. The same class again (a module imported
        twice, a ``--load`` file loaded again) replaces itself; another class under a taken name is
        an error naming both modules."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
        old = self._classes.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"{self.kind} {name!r} is registered twice: "
                             f"{old.__module__} and {cls.__module__}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name is one line listing the valid ones."""
        self.load()
        try:
            return self._classes[name]
        except KeyError:
            raise self.unknown(f"unknown {self.kind} {name!r}; valid choices: "
                               f"{', '.join(sorted(self._classes)) or NOT_INSTALLED}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load()
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._classes

    def broken(self) -> dict[str, str]:
        """The group's plug-ins that failed to load, with the reason."""
        self.load()
        return dict(self._broken)

    def load(self) -> None:
        """Load every entry point of the group, once (loading a module runs its decorators)."""
        if self._loaded:
            return
        self._loaded = True
        for ep in metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plug-in is reported, not raised
                self._broken[ep.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"attnbench plug-in {ep.name!r} ({ep.value}) failed to load: {exc}",
                              stacklevel=3)

    def forget_loaded(self) -> None:
        """Forget the broken plug-ins and that the group was loaded: the next look-up loads it again
        (for tests that install a plug-in, and their clean-up)."""
        self._loaded = False
        self._broken.clear()

    def reload(self) -> None:
        """Discover the group's plug-ins again now."""
        self.forget_loaded()
        self.load()

    def unregister(self, *names: str) -> None:
        """Remove ``names`` (absent ones are ignored): a test's plug-in, gone after the test."""
        for name in names:
            self._classes.pop(name, None)

    def unregister_module(self, module: str) -> None:
        """Remove every class registered from ``module`` (a ``--load`` file's stem, say)."""
        self.unregister(*[n for n, cls in self._classes.items() if cls.__module__ == module])


ENTRY_POINT_GROUP = "attnbench.mechanisms"
MECHANISMS: Registry[type] = Registry("mechanism", ENTRY_POINT_GROUP, UnknownMechanismError)


def register_mechanism(cls: type) -> type:
    """Class decorator: add a ``Mechanism`` subclass to the registry under ``cls.name``."""
    return MECHANISMS.register(cls)


def mechanism_names() -> list[str]:
    """Every registered mechanism name, sorted."""
    return MECHANISMS.names()


def broken_plugins() -> dict[str, str]:
    """Mechanism plug-ins that failed to load, with the reason."""
    return MECHANISMS.broken()


def get_mechanism(name: str) -> type:
    """The registered class for ``name``; an unknown name lists the valid ones."""
    return MECHANISMS.get(name)


def load_module(spec: str) -> None:
    """Import a module name or a ``.py`` file path (``--load``): the mechanisms and tasks it registers
    join the registries. A missing file, or a module that fails to import, is a one-line ``LoadError``."""
    path = Path(spec)
    if spec.endswith(".py") and not path.is_file():
        raise LoadError(f"--load {spec}: no such file")
    try:
        if spec.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except Exception as exc:  # the module's own mistake: one line saying where, not a traceback
        raise LoadError(f"--load {spec}: cannot import it: {_where(exc)}") from None


def plugin_spec(spec: str) -> str:
    """``spec`` as another process loads it: a ``.py`` path made absolute, a module name as it is."""
    return str(Path(spec).resolve()) if spec.endswith(".py") else spec


def _where(exc: BaseException) -> str:
    """``file.py:3: SyntaxError: invalid syntax``: the line an import failed at, and why."""
    if isinstance(exc, SyntaxError):
        return f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
    if isinstance(exc, ImportError):  # a missing module: its name says it all
        return f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    place = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{place}{type(exc).__name__}: {exc}"


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
