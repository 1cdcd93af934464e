"""Environment files as systemd's ``EnvironmentFile=`` reads them, for ``${VAR}`` in the configuration.

The unit reads /etc/shipper/environment (written at boot, e.g. by cloud-init); ``shipper check`` and
``shipper run --env-file`` read the same file the same way, so that a configuration can be checked
with the values the service will have.
"""

from __future__ import annotations

import os
import re

from shipper.errors import ConfigError

DEFAULT_ENV_FILE = "/etc/shipper/environment"
MAX_ENV_FILE_BYTES = 1024 * 1024

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOUBLE_QUOTED_ESCAPES = {'"': '"', "\\": "\\", "$": "$", "`": "`", "n": "\n", "t": "\t"}


def parse_env_text(text: str, source: str) -> dict[str, str]:
    """``KEY=VALUE`` lines -> a dict; ConfigError naming the file and line for anything else.

    As systemd reads them: blank lines and lines starting with ``#`` or ``;`` are comments; a value
    may be in single quotes (literal) or double quotes (backslash escapes); unquoted values lose
    their surrounding blanks; a backslash at the end of a line continues the value on the next.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].strip()
        index += 1
        while line.endswith("\\") and index < len(lines):
            line = line[:-1] + lines[index].strip()
            index += 1
        if not line or line.startswith(("#", ";")):
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if name.startswith("export "):
            problems.append(f"{source}:{number}: 'export' is not understood by systemd's EnvironmentFile; "
                            f"write {name[7:].strip()}=...")
            continue
        if not equals or not _NAME.match(name):
            problems.append(f"{source}:{number}: expected NAME=VALUE (NAME of letters, digits and _), "
                            f"got {line[:60]!r}")
            continue
        try:
            values[name] = _unquote(value.strip())
        except ValueError as exc:
            problems.append(f"{source}:{number}: {name}: {exc}")
    if problems:
        raise ConfigError(problems, source)
    return values


def _unquote(value: str) -> str:
    if value[:1] == "'":
        if len(value) < 2 or not value.endswith("'"):
            raise ValueError("the single quote is not closed")
        return value[1:-1]
    if value[:1] != '"':
        return value
    out, position = [], 1
    while position < len(value):
        char = value[position]
        if char == "\\" and position + 1 < len(value):
            following = value[position + 1]
            out.append(_DOUBLE_QUOTED_ESCAPES.get(following, "\\" + following))
            position += 2
            continue
        if char == '"':
            if position != len(value) - 1:
                raise ValueError("text after the closing double quote")
            return "".join(out)
        out.append(char)
        position += 1
    raise ValueError("the double quote is not closed")


def read_env_file(path: str) -> dict[str, str]:
    """The variables of one environment file; ConfigError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ENV_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the environment file: {exc.strerror}"], path) from None
    if len(data) > MAX_ENV_FILE_BYTES:
        raise ConfigError([f"{path}: an environment file of over 1 MiB: is it the right file?"], path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"], path) from None
    return parse_env_text(text, path)


def environment_with(env_file: str | None) -> dict[str, str]:
    """The process environment, with an environment file's values over it (as the unit's
    ``EnvironmentFile=`` comes after ``Environment=``)."""
    environ = dict(os.environ)
    if env_file:
        environ.update(read_env_file(env_file))
    return environ
