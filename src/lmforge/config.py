"""Configuration as dataclasses: loaded from dicts, TOML files and `key=value` overrides, with
errors that list the valid keys instead of silently ignoring a typo."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from .errors import LMForgeError

C = TypeVar("C", bound="ConfigBase")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise LMForgeError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")


def parse_value(text: str, typ: Any, key: str) -> Any:
    """Turn the text of a `--set key=value` into the field's type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # e.g. int | None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if typ is float:
            return float(text)
        if origin in (list, tuple):
            return [s.strip() for s in text.split(",") if s.strip()]
        return text
    except ValueError:
        raise LMForgeError(f"{key}={text!r}: expected a value of type {getattr(typ, '__name__', typ)}") from None


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Values from JSON/TOML: accept ints for floats, strings via parse_value."""
    if isinstance(value, str) and typ is not str:
        return parse_value(value, typ, key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class ConfigBase:
    """Mixin for config dataclasses."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def check_keys(cls, keys, where: str = "config") -> None:
        valid = cls.field_types()
        for key in keys:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise LMForgeError(
                    f"unknown {where} key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], where: str = "config") -> C:
        cls.check_keys(d, where)
        types_ = cls.field_types()
        return cls(**{k: _coerce(v, types_[k], k) for k, v in d.items()})  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        return self.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        pass

    # helpers for validate()
    def fail(self, message: str) -> None:
        raise LMForgeError(f"{type(self).__name__}: {message}")

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                self.fail(f"{name} must be positive, got {getattr(self, name)}")

    def check_heads(self, dim: int, n_head: int, n_kv_head: int | None) -> None:
        if n_head <= 0 or dim % n_head:
            self.fail(f"n_embd ({dim}) must be divisible by n_head ({n_head})")
        if n_kv_head is not None and (n_kv_head <= 0 or n_head % n_kv_head):
            self.fail(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head})")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}; values stay text until a config types them."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LMForgeError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
