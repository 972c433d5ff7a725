"""Load a :class:`RunConfig` from YAML files plus dotted command-line overrides.

- ``defaults: [base.yaml, ...]`` in a file names files (relative to it) merged first, in
  order; the file's own keys win.
- Overrides are ``a.b.c=value``; the value is parsed as YAML (``1e-6``, ``true``, ``[1,2]``).
- Every key remembers where it was set, so an unknown key or a wrong type is reported
  with the dotted key *and* the file (or ``command line``) that set it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.schema import DAPO_PRESET, RunConfig

COMMAND_LINE = "command line"


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: a config must be a YAML file, and this is not a regular file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}): a config must be YAML") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, sources: dict, source: str, prefix: str = "") -> None:
    """Deep-merge ``top`` into ``base`` in place, recording the source of each leaf."""
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = value
            sources[dotted] = source
            if isinstance(value, dict):
                for sub in _leaf_keys(value, dotted + "."):
                    sources[sub] = source


def _leaf_keys(tree: dict, prefix: str) -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value, prefix + key + "."))
    return keys


def load_yaml_tree(path: str | Path, sources: dict | None = None, _seen: tuple = ()) -> dict:
    """Read ``path`` with its ``defaults:`` chain into one plain dict."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(map(str, _seen + (path,)))}")
    sources = {} if sources is None else sources
    own = _read_yaml(path)
    defaults = own.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(name, str) and name for name in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of file names, got {defaults!r}", key="defaults")
    tree: dict = {}
    for name in defaults:
        parent = load_yaml_tree(path.parent / name, sources, _seen + (path,))
        _merge(tree, parent, {}, "")
    _merge(tree, own, sources, str(path))
    return tree


def apply_override(tree: dict, override: str, sources: dict) -> None:
    """Apply one ``a.b=value`` override to a plain dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{part}' is not a section")
    node[parts[-1]] = value
    sources[key] = COMMAND_LINE


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, sources: dict) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    where = sources.get(key, "defaults")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, sources)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} (set in {where}): expected {_type_name(tp)}, got {value!r}", key=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} (set in {where}): {value!r} is not one of {list(choices)}", key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} (set in {where}): expected a list, got {value!r}", key=key)
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:  # e.g. launch.env: string keys, scalar values read as strings (FOO: 1 -> "1")
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (set in {where}): expected a mapping, got {value!r}", key=key)
        _, value_type = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if value_type is str and isinstance(v, (int, float, bool)):
                v = str(v)
            out[str(k)] = _coerce(v, value_type, f"{key}.{k}", sources)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (set in {where}): expected a section (mapping), got {value!r}", key=key)
        return build_dataclass(tp, value, sources, key + ".")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-6' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} (set in {where}): expected float, got {value!r}", key=key)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} (set in {where}): expected int, got {value!r}", key=key)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key} (set in {where}): expected {tp.__name__}, got {value!r}", key=key)
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}", key=key)


def _where(sources: dict, dotted: str) -> str:
    """Who set ``dotted`` (or, for a section, any key under it): a file or the command line."""
    if dotted in sources:
        return sources[dotted]
    under = [source for key, source in sources.items() if key.startswith(dotted + ".")]
    return under[-1] if under else "defaults"


def build_dataclass(cls: type, tree: dict, sources: dict | None = None, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    sources = sources or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in names:
            dotted = prefix + key
            where = _where(sources, dotted)
            raise ConfigError(f"unknown key '{dotted}' (set in {where}); valid keys here: {sorted(names)}", key=dotted)
    kwargs = {k: _coerce(v, hints[k], prefix + k, sources) for k, v in tree.items()}
    return cls(**kwargs)


def _apply_presets(tree: dict, sources: dict) -> None:
    """``algorithm.name: dapo``: DAPO's settings (``DAPO_PRESET``) for the algorithm keys the
    config does not set; each records the preset as where it was set."""
    algorithm = tree.get("algorithm")
    if not isinstance(algorithm, dict) or algorithm.get("name") != "dapo":
        return
    for key, value in DAPO_PRESET.items():
        if key not in algorithm:
            algorithm[key] = value
            sources[f"algorithm.{key}"] = "the algorithm.name=dapo preset"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """The one way to get a run config: file (optional) + overrides, typed and validated."""
    sources: dict = {}
    tree = load_yaml_tree(path, sources) if path is not None else {}
    for override in overrides:
        apply_override(tree, override, sources)
    _apply_presets(tree, sources)
    config = build_dataclass(RunConfig, tree, sources)
    try:
        config.validate()
    except ConfigError as exc:
        where = sources.get(exc.key or "", "defaults")
        raise ConfigError(f"{exc} (set in {where})", key=exc.key) from None
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
