"""Typed configs: one dataclass per component, loadable from YAML, validated with errors that
name the field, the bad value and what is allowed.

Every component config subclasses :class:`ConfigBase`. ``from_dict`` builds nested dataclasses,
refuses unknown keys (listing the valid ones, so a typo is caught, not silently ignored) and
calls ``validate()`` on every level.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Self

import yaml


class ConfigError(ValueError):
    """A config value is wrong. The message names the field, the value and the fix."""


def is_int(value: Any) -> bool:
    """True for an int that is not a bool (YAML's true would pass ``isinstance(x, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"config field `{field}` = {value!r} is invalid: {allowed}")


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` naming ``field`` unless ``ok``."""
    if not ok:
        fail(field, value, allowed)


def check_choice(field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, field, value, f"must be one of {choices}")


def check_positive(field: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    check(ok, field, value, "must be a number >= 0" if allow_zero else "must be a number > 0")


def check_positive_ints(config: Any, prefix: str, names: typing.Iterable[str]) -> None:
    """ConfigError unless each field in ``names`` of ``config`` is an integer > 0 (not a bool)."""
    for name in names:
        value = getattr(config, name)
        check(is_int(value) and value > 0, f"{prefix}{name}", value, "must be an integer > 0")


def check_fraction(field: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= value <= 1.0
    check(ok, field, value, "must be a number in [0, 1]")


@dataclasses.dataclass
class ConfigBase:
    """Base of every typed config."""

    def validate(self, prefix: str = "") -> None:
        """Check field values; subclasses extend it. ``prefix`` is the dotted path for errors."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value.validate(prefix=f"{prefix}{f.name}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "") -> Self:
        data = dict(data or {})
        if not isinstance(data, dict):
            fail(prefix.rstrip(".") or cls.__name__, data, "must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {[prefix + k for k in unknown]} in {cls.__name__}; "
                f"valid fields: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
        obj = cls(**kwargs)
        if not prefix:
            obj.validate()
        return obj

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> Self:
        """Load from a YAML file (optionally one top-level ``section`` of it)."""
        data = load_yaml(path)
        if section is not None:
            data = data.get(section, {})
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a path to a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key (overrides of a YAML)."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if nested else value
    return out


def _coerce(hint: Any, value: Any, field: str) -> Any:
    """Turn YAML values into the annotated type (nested configs, tuples, floats from ints)."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            fail(field, value, f"must be a mapping of {hint.__name__} fields")
        return hint.from_dict(value, prefix=f"{field}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, field) if len(args) == 1 else value
    if origin is typing.Literal:
        check_choice(field, value, typing.get_args(hint))
        return value
    if hint is float:
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            field,
            value,
            "must be a number",
        )
        return float(value)
    if hint is int:
        check(is_int(value), field, value, "must be an integer")
        return value
    if hint is bool:
        check(isinstance(value, bool), field, value, "must be true or false")
        return value
    if hint is str:
        check(isinstance(value, str), field, value, "must be a string")
        return value
    if origin in (tuple, list):
        check(isinstance(value, (list, tuple)), field, value, "must be a list")
        return origin(value)
    if origin is dict:
        check(isinstance(value, dict), field, value, "must be a mapping")
        return dict(value)
    return value
