"""What the network inputs (forward, syslog) share: journaled inputs (``journaled``) whose producers
are listeners. The tag a peer names is kept to a safe alphabet and length, and
an input takes at most ``MAX_TAGS`` distinct tags (a peer inventing one per event would otherwise
grow every per-tag table of the agent): the others are folded into ``<prefix>other``, counted.
"""

from __future__ import annotations

import os
import re
import socket
import threading

from shipper.errors import ConfigError
from shipper.inputs.journaled import JournaledInput
from shipper.inputs.listeners import (
    bind_inet, bind_unix, in_use_problem, remote_problem, server_tls_context, socket_problems, tls_problems,
)
MAX_TAG_CHARS = 128
MAX_TAGS = 1000
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def safe_tag(tag: str) -> str:
    """A peer's tag as a record's tag: letters, digits, ``._-`` (others become ``_``), 128 at most."""
    cleaned = _TAG_UNSAFE.sub("_", tag[:MAX_TAG_CHARS])
    return cleaned.strip(".") or "_"


class NetworkInput(JournaledInput):
    """Base of the forward and syslog inputs: a journaled input with a tag table; its producers
    are its listeners (``make_producers``)."""

    def __init__(self, settings, context):
        self.settings = settings
        self.tags: dict[str, str] = {}
        self.tags_lock = threading.Lock()
        name = settings.get("id") or f"{settings.type}-{settings.tag}"
        super().__init__(settings.tag, name, os.path.join(context.data_dir, "journal", safe_tag(name)),
                         settings.journal_max_bytes, context.stats, context.checkpoint_interval, settings.where)

    # ------------------------------------------------------------ tags

    def record_tag(self, tag: str) -> str:
        tag = tag[:MAX_TAG_CHARS]  # the table never keeps more of a peer's tag than a record does
        known = self.tags.get(tag)
        if known is not None:
            return known
        prefix = self.settings.get("tag_prefix") or ""
        with self.tags_lock:
            if len(self.tags) >= MAX_TAGS:
                self.stats.add("tags_folded", 1, input=self.tag)
                return prefix + "other"
            made = self.tags[tag] = prefix + safe_tag(tag)
        return made


def stream_sockets(settings, where: str, tls: bool = True) -> list:
    """The listening stream sockets of an input's ``listen`` and ``socket`` (ConfigError when one
    cannot be made: an address in use, a path that is not a socket)."""
    sockets = []
    context = server_tls_context(settings, where) if tls else None
    try:
        if settings.listen:
            sockets.append((bind_inet(settings.listen, where=f"{where}.listen"), context))
        if settings.socket:
            sockets.append((bind_unix(settings.socket, socket.SOCK_STREAM, int(settings.socket_mode, 8),
                                      settings.socket_group, where=f"{where}.socket"), None))
    except ConfigError:
        for sock, _ in sockets:
            sock.close()
        raise
    return sockets


def listener_problems(settings, where: str) -> list[str]:
    """What the config alone tells of the listeners (also checked at every start and reload)."""
    problems = []
    if settings.get("listen"):
        problem = remote_problem(where, settings.listen, settings.allow_remote)
        if problem:
            problems.append(problem)
    problems.extend(tls_problems(where, settings))
    return problems


def message_size_problems(settings) -> list[str]:
    """A message must fit the journal's frames (half of journal_max_bytes) with room to grow (invalid
    UTF-8 replaced, the row's fields): at most a quarter of it."""
    if settings.get("max_message_bytes", 0) > settings.get("journal_max_bytes", 0) // 4:
        return [f"{settings.where}.max_message_bytes: at most a quarter of journal_max_bytes "
                f"({settings.journal_max_bytes // 4} bytes), or a message could never be journaled"]
    return []


def check_listeners(settings, kinds: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """``shipper check``: (problems, warnings) of the machine as it is now: the socket's directory,
    and whether each address is free (a running agent holds its own: a warning, not an error)."""
    problems: list[str] = []
    warnings: list[str] = []
    where = settings.where
    if settings.get("socket"):
        problems.extend(socket_problems(where, settings.socket, settings.socket_group))
    for listen, kind in kinds:
        problem = in_use_problem(where, listen, kind)
        if problem:
            warnings.append(problem)
    return problems, warnings


