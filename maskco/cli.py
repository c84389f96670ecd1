"""One command-line grammar for every tool: ``train``, ``show``, ``bench``, ``quality``, ``evaluate.*``, ``export``.

- ``--key=value`` and ``--key value`` are the same; so are ``_`` and ``-`` in a key (``--out_dir`` is
  ``--out-dir``);
- booleans are ``--flag`` / ``--no-flag`` (config keys also take ``--flag=true|false``);
- ``-h`` / ``--help`` prints usage and every option.

Two front ends share it. :class:`ArgumentParser` is argparse for the tools with their own options;
:func:`parse_config_args` reads the trainer's positional presets and config keys (``train``, ``show``),
whose help (:func:`config_help`) is generated from the commented dataclass in ``maskco/config.py``.
A bad input is one line (:func:`one_line`) and exit code 2 everywhere.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import textwrap
import typing
from dataclasses import MISSING, dataclass, field, fields

from maskco import config
from maskco.config import CHOICES, Config, ConfigError

BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


def normalise_option(arg: str) -> str:
    """``--out_dir=x`` -> ``--out-dir=x``: argparse options are registered with ``-``."""
    if not arg.startswith("--") or arg == "--":
        return arg
    key, sep, value = arg[2:].partition("=")
    return "--" + key.replace("_", "-") + sep + value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this grammar: ``_`` and ``-`` alike in option names, and every ``store_true``
    option also a ``--no-flag`` (``argparse.BooleanOptionalAction``)."""

    def add_argument(self, *names, **kwargs):
        if kwargs.get("action") == "store_true":
            kwargs.update(action=argparse.BooleanOptionalAction, default=kwargs.get("default", False))
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if "--" in args:  # everything after "--" is positional: leave it as typed
            cut = args.index("--")
            args = [normalise_option(a) for a in args[:cut]] + args[cut:]
        else:
            args = [normalise_option(a) for a in args]
        return super().parse_known_args(args, namespace)


# ---- the trainer's grammar: presets and config keys

@dataclass
class ConfigArgs:
    """A command line of ``train`` / ``show``, read: ``config`` for ``build_config`` (presets and
    ``--key=value``), the tool's own ``options``, and whether help was asked for."""

    config: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    help: bool = False

    @property
    def presets(self) -> list[str]:
        return [arg for arg in self.config if not arg.startswith("--")]


def _kind(key: str, options: dict):
    if key in options:
        return type(options[key])
    return typing.get_type_hints(Config).get(key)


def parse_config_args(argv: typing.Sequence[str], options: dict | None = None) -> ConfigArgs:
    """Read ``[preset ...] [--key=value | --key value | --flag | --no-flag ...]`` (any order).

    ``options``: the tool's own options and their defaults (the default's type is the option's type);
    everything else is a config key, checked later by ``build_config``.
    """
    options = dict(options or {})
    result = ConfigArgs(options=dict(options))
    args, i = list(argv), 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg in ("-h", "--help"):
            result.help = True
            continue
        if not arg.startswith("--"):
            if arg.startswith("-") and len(arg) > 1:
                raise ConfigError(f"unknown option {arg!r}: options look like --key=value or --key value")
            result.config.append(arg)  # a preset
            continue
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        kind = _kind(key, options)
        if not sep:
            if kind is bool:
                value = "true"
                if i < len(args) and args[i].lower() in BOOL_WORDS:  # --flag false
                    value, i = args[i], i + 1
            elif key.startswith("no_") and _kind(key[3:], options) is bool:
                key, value = key[3:], "false"
            elif kind is None:
                config.parse_override(f"--{key}=")  # raises: unknown key, with the valid ones
            elif i >= len(args):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            else:
                value, i = args[i], i + 1
        if key in options:
            result.options[key] = _option_value(key, value, type(options[key]))
        else:
            result.config.append(f"--{key}={value}")
    return result


def _option_value(key: str, value: str, kind: type):
    if kind is bool:
        if value.lower() not in BOOL_WORDS:
            raise ConfigError(f"--{key}: expected true or false, got {value!r}")
        return value.lower() in ("true", "yes", "on")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"--{key}: expected {kind.__name__}, got {value!r}") from None


# ---- help, from the commented dataclass

def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return "[" + ", ".join("FLOAT" for _ in typing.get_args(kind)) + "]"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(kind, str(kind))


def _field_docs() -> list[tuple[str | None, str, str]]:
    """(group header or None, field name, description) in source order, from maskco/config.py."""
    docs, names = [], {f.name for f in fields(Config)}
    for line in inspect.getsource(Config).splitlines():
        header = re.match(r"\s*# ---- (.*)", line)
        if header:
            docs.append((header.group(1), "", ""))
            continue
        found = re.match(r"\s*(\w+):", line)
        if found and found.group(1) in names:
            docs.append((None, found.group(1), line.split("  # ", 1)[1].strip() if "  # " in line else ""))
    return docs


def _shown(value) -> str:
    """A default as it is typed on the command line (false, resnet50, [0.2, 1.0])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value) if value != "" else '""'


def config_help() -> str:
    """Every config key with its type, default and description, grouped as the dataclass is."""
    hints, defaults = typing.get_type_hints(Config), {f.name: f.default for f in fields(Config)}
    lines = ["config keys (--key=value or --key value; _ and - are the same; booleans also --key / --no-key):"]
    for header, name, text in _field_docs():
        if header:
            lines.append(f"\n  {header}")
            continue
        default = defaults[name] if defaults[name] is not MISSING else None
        if hints[name] is bool:
            usage = f"--{name} / --no-{name}"
        else:
            usage = f"--{name} {_type_name(hints[name])}"
        if name in CHOICES and "|" not in text:
            text = f"{text}; one of {' | '.join(CHOICES[name])}".lstrip("; ")
        text = f"{text} (default:\0{_shown(default)})".lstrip()  # \0: no line break inside "(default: x)"
        lines.append(f"    {usage}")
        lines.extend(line.replace("\0", " ") for line in
                     textwrap.wrap(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


def presets() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(config.PRESET_DIR) if name.endswith(".yaml"))


def usage_text(prog: str, summary: str, own: str = "", own_usage: str = "") -> str:
    """The usage line, the tool's own options, the presets, then every config key."""
    parts = [f"usage: {prog} [PRESET ...] [--key=value | --key value ...]{own_usage}", "", summary, "",
             f"presets (maskco/configs/*.yaml, or a YAML path; later ones win): {', '.join(presets())}",
             "", "options:\n  -h, --help    this help" + (f"\n{own}" if own else ""), "", config_help()]
    return "\n".join(parts)


# ---- errors

def one_line(error: BaseException) -> str:
    """An error as one line. An exception raised in a DataLoader worker arrives in the main process
    re-raised with the worker's whole traceback as its message; keep only the original message."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return " ".join(text.split())


def fail(prog: str, error: BaseException, quiet: bool = False) -> int:
    """Print ``prog: error: <one line>`` on stderr (not when ``quiet``: another rank says it); the exit code
    for a bad input (2)."""
    if not quiet:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


def check_device(device: str) -> None:
    """``device=cuda`` on a machine where torch sees no GPU is a bad input, not a traceback."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                          "use --device=cpu or --device=auto")


def derive_out_dir(cfg: Config, args: ConfigArgs) -> tuple[Config, str]:
    """-> (cfg, note). A command line that changes the model (``ARCHITECTURE_KEYS``) against its presets
    and names no ``--out_dir`` gets a folder of its own (``runs/cpu_demo-mph-none``): the preset's folder
    holds a checkpoint of the preset's model, which this run could not resume."""
    if any(arg.startswith("--out_dir=") for arg in args.config):
        return cfg, ""
    given = {arg[2:].split("=", 1)[0] for arg in args.config if arg.startswith("--")}
    try:
        base = config.build_config(args.presets)
    except ConfigError:  # the presets alone are not a valid run: nothing to compare with
        return cfg, ""
    changed = [key for key in config.ARCHITECTURE_KEYS if key in given and getattr(cfg, key) != getattr(base, key)]
    if not changed:
        return cfg, ""
    suffix = "-".join(f"{key}-{getattr(cfg, key)}" for key in changed)
    out_dir = f"{cfg.out_dir.rstrip('/')}-{suffix}"
    return config.replace(cfg, out_dir=out_dir), f"not {cfg.out_dir}: the model differs ({', '.join(changed)})"
