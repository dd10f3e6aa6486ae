"""ml_collections configs for the experiment CLIs: parsing, validation of overrides, JSON round trip.

Every experiment entry point follows one pattern::

    # experiments/pretrain_base.py
    from metalora.config_utils import run_cli

    def main(config, workdir): ...

    if __name__ == "__main__":
        run_cli(main)

    $ python -m experiments.pretrain_base --config configs/base_tiny.py:smoke --workdir /tmp/run --config.train.steps=10

``--config FILE.py[:ARG]`` calls ``get_config(ARG)`` of that file (ml_collections ``DEFINE_config_file``), the
config is locked (no new keys), and ``--config.a.b=value`` overrides an existing field with type checking. A
misspelled key is reported with the offending flag, the config file and the keys that do exist, instead of
ml_collections' bare ``KeyError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from metalora import host
from metalora.train.io import atomic_write_text

__all__ = [
    "CLIArgs",
    "ConfigError",
    "check_overrides",
    "config_to_dict",
    "config_to_json",
    "load_config",
    "parse_cli",
    "run_cli",
    "save_config",
]

_OVERRIDE = re.compile(r"^--(?:no)?config\.([^=\s]+)")


class ConfigError(ValueError):
    """A config file or a ``--config.*`` override is invalid (the message names the file/key/flag)."""


@dataclasses.dataclass(frozen=True)
class CLIArgs:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path


def _config_arg(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` (``--config=x`` or ``--config x``) in ``argv``, if present."""
    for i, tok in enumerate(argv):
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
        if tok == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], source: str = "config") -> None:
    """Raise ``ConfigError`` if a ``--config.a.b[=v]`` / ``--noconfig.a.b`` in ``argv`` names no field of ``config``.

    ``source`` (the config file) is quoted in the message.
    """
    for tok in argv:
        m = _OVERRIDE.match(tok)
        if not m:
            continue
        path = re.sub(r"\[[^\]]*\]", "", m.group(1))  # `a.b[0]` indexes into field a.b
        node: Any = config
        walked: list[str] = []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(
                    f"{tok}: {'.'.join(walked)!r} in {source} is a value of type {type(node).__name__}, not a config "
                    f"group, so it has no field {part!r}"
                )
            if part not in node:
                where = f"config.{'.'.join(walked)}" if walked else "the top level of the config"
                raise ConfigError(
                    f"{tok}: unknown config key {'.'.join([*walked, part])!r} in {source}; "
                    f"fields at {where}: {', '.join(sorted(node.keys()))}"
                )
            node = node[part]
            walked.append(part)


def parse_cli(argv: Sequence[str], *, require_workdir: bool = True) -> CLIArgs:
    """Parse ``prog --config FILE.py[:ARG] --workdir DIR [--config.key=value ...]``.

    Uses a private ``absl.flags.FlagValues`` (no global flag registry), so it can be called repeatedly, e.g. in
    tests. Raises ``ConfigError`` for a missing/unloadable config, an unknown override key, a bad override value or
    an unexpected argument.
    """
    argv = list(argv)
    config_spec = _config_arg(argv)
    if config_spec is None:
        raise ConfigError("missing --config FILE.py[:ARG]")
    source = config_spec.split(":", 1)[0]
    # Load once without overrides to check the override keys against the real fields (clear message), then parse
    # for real with overrides applied and type-checked by ml_collections.
    base_argv = [argv[0], f"--config={config_spec}"]
    base = _parse(base_argv, source)[0]
    check_overrides(base, argv[1:], source)
    config, workdir, rest = _parse(argv, source)
    if len(rest) > 1:
        raise ConfigError(f"unexpected positional arguments {rest[1:]}")
    if workdir is None and require_workdir:
        raise ConfigError("missing --workdir DIR")
    return CLIArgs(config=config, workdir=pathlib.Path(workdir) if workdir is not None else None)


def _parse(argv: list[str], source: str) -> tuple[ml_collections.ConfigDict, str | None, list[str]]:
    fv = flags.FlagValues()
    config_holder = config_flags.DEFINE_config_file(
        "config", None, "Python config file, `path.py[:arg]`", flag_values=fv, lock_config=True, sys_argv=argv
    )
    workdir_holder = flags.DEFINE_string("workdir", None, "Output folder of the run", flag_values=fv)
    try:
        with warnings.catch_warnings():  # ml_collections loads config files with the deprecated load_module()
            warnings.filterwarnings("ignore", message=r"the load_module\(\) method is deprecated")
            rest = fv(argv)
            config = config_holder.value
    except flags.Error as e:
        raise ConfigError(f"{source}: {e}") from e
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"could not load config {source}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{source}: get_config() must return an ml_collections.ConfigDict, got {type(config)}")
    return config, workdir_holder.value, rest


def run_cli(main: Callable[[ml_collections.ConfigDict, pathlib.Path], Any], argv: Sequence[str] | None = None) -> Any:
    """Parse the command line and call ``main(config, workdir)``; CLI errors exit with status 2 and one clear line.

    From the real command line (``argv=None``) the process first restarts itself with glibc's malloc tunables
    (:mod:`metalora.host`): XLA:CPU's per-call temporaries otherwise page-fault on every training step."""
    if argv is None:
        host.reexec_with_malloc_tunables()
    argv = list(sys.argv if argv is None else argv)
    if any(tok in ("-h", "--help", "--helpfull") for tok in argv[1:]):
        print(f"usage: {argv[0]} --config FILE.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]")
        return None
    try:
        args = parse_cli(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return main(args.config, args.workdir)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)  # callables, dtypes...: recorded for the reader, not for reloading


def config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON-compatible dict (tuples → lists, numpy → Python, other objects → ``repr``)."""
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        config = config.to_dict()
    return _jsonable(config)


def config_to_json(config: ml_collections.ConfigDict | Mapping[str, Any], indent: int = 2) -> str:
    """The config as sorted, indented JSON text."""
    return json.dumps(config_to_dict(config), indent=indent, sort_keys=True, allow_nan=True)


def save_config(config: ml_collections.ConfigDict | Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Write ``config_to_json(config)`` to ``path`` atomically."""
    return atomic_write_text(path, config_to_json(config) + "\n")


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read a ``config.json`` written by ``save_config`` back as a ConfigDict (tuples come back as lists)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return ml_collections.ConfigDict(data)
