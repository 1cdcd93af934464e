"""``modify``: reshape records, and set their tag from their content (content-based routing, like
Fluent Bit's ``modify`` and ``rewrite_tag``).

```toml
[[filters]]
type = "modify"
match = ["app"]
rename = { msg = "text" }                        # old name -> new name
copy = { user = "user_id" }                      # from -> to
set = { service = "{labels.app}-{source}" }      # always (a template, or a number/boolean)
add = { env = "prod" }                           # only when the record has no such field
remove = ["password", "debug"]
tag_regex = '\\b(?P<severity>ERROR|FATAL)\\b'     # optional: only records whose tag_field matches ...
tag = "app.errors"                               # ... get this tag (a template: "{service}.{severity}")
```

Operations run in this order: rename, copy, set, add, remove, tag. Templates name ``tag``, ``source``,
``message``, ``level``, ``labels.NAME`` (from [agent.labels], checked at load), the identity keys
(``host``, ``instance_id``, ...), the regex's named groups (for ``tag``) and the record's fields
(parsed, dotted for nested: ``http.status``). A template naming something a record does not have leaves
that record alone for that operation (counted as ``filter_template_misses{filter=}``).

Fields set here live among the parsed fields (record.PARSED): they can never pose as the agent's keys
(a reserved name such as ``time`` or ``host`` lands under ``fields``, as a parser's would). Plain lines
stay a blob: changed fields ride along, one dict per line, shared by the lines whose result is the
same (no template naming the message: one dict for a whole batch), so record.encode_plain_fields keeps
the fast encoding; a tag that is the same for the whole batch cuts the lines ``tag_regex`` matches as
grep does. Fields dicts are copied before they change (they may be shared). Records split by tag go on
as one batch per tag, records in order. At most ``max_tags`` distinct tags are made (a regex group from the content must not
make a tag per line): past that, records keep their tag.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from shipper.config import Option, Settings
from shipper.filters import Filter, FilterContext, derived, field_value, keep_records
from shipper.filters.grep import LinePattern, line_ranges
from shipper.record import IDENTITY_KEYS, PARSED, Batch

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 256
_NAME = re.compile(r"[^{}]+")


# ---------------------------------------------------------------- templates

class TemplateError(ValueError):
    pass


def parse_template(text: str) -> list[tuple[bool, str]]:
    """"{labels.app}-{source}" -> [(True, "labels.app"), (False, "-"), (True, "source")]; "{{" and "}}"
    are literal braces."""
    parts: list[tuple[bool, str]] = []
    literal: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char in "{}" and text[index + 1:index + 2] == char:
            literal.append(char)
            index += 2
        elif char == "{":
            end = text.find("}", index)
            name = text[index + 1:end] if end >= 0 else ""
            if end < 0 or not _NAME.fullmatch(name) or name.strip() != name:
                raise TemplateError(f"{text!r}: a placeholder is {{name}} (write {{{{ for a literal brace)")
            if literal:
                parts.append((False, "".join(literal)))
                literal = []
            parts.append((True, name))
            index = end + 1
        elif char == "}":
            raise TemplateError(f"{text!r}: '}}' without its '{{' (write }}}} for a literal brace)")
        else:
            literal.append(char)
            index += 1
    if literal:
        parts.append((False, "".join(literal)))
    return parts


# Names every record of a batch shares: a template of only these is rendered once per batch.
def batch_constant(parts: list[tuple[bool, str]]) -> bool:
    return all(not named or name in ("tag", "source") or name.startswith("labels.") or name in IDENTITY_KEYS
               for named, name in parts)


class Template:
    __slots__ = ("parts", "names", "constant")

    def __init__(self, text: str):
        self.parts = parse_template(text)
        self.names = [name for named, name in self.parts if named]
        self.constant = batch_constant(self.parts)

    def render(self, lookup) -> str | None:
        """The text, with each name's value from ``lookup(name)``; None when one of them has none."""
        out = []
        for named, text in self.parts:
            if not named:
                out.append(text)
                continue
            value = lookup(text)
            if value is None:
                return None
            out.append(value if isinstance(value, str) else str(value))
        return "".join(out)


class Lookup:
    """Where a template's names find their values for one record."""

    __slots__ = ("envelope", "tag", "source", "message", "extra", "groups")

    def __init__(self, envelope, tag, source, message=None, extra=None, groups=None):
        self.envelope, self.tag, self.source = envelope, tag, source
        self.message, self.extra, self.groups = message, extra, groups

    def __call__(self, name: str) -> Any:
        if self.groups is not None and name in self.groups:
            return self.groups[name]
        if name.startswith("labels."):
            return self.envelope.labels.get(name[len("labels."):])
        if name in IDENTITY_KEYS:
            return self.envelope.identity.get(name)
        return field_value(name, self.message, self.extra, self.tag, self.source)


# ---------------------------------------------------------------- field operations (pure)

def _parsed(extra: dict) -> dict:
    parsed = extra.get(PARSED)
    if parsed is None:
        parsed = extra[PARSED] = {}
    return parsed


def _take(extra: dict | None, name: str) -> tuple[bool, Any]:
    """Remove a field (parsed, or an input's own such as journald's unit; never an agent key)."""
    if not extra:
        return False, None
    parsed = extra.get(PARSED)
    if parsed and name in parsed:
        return True, parsed.pop(name)
    if name[:1] != "\x00" and name in extra and name != PARSED:
        return True, extra.pop(name)
    return False, None


def _get(extra: dict | None, name: str) -> tuple[bool, Any]:
    if not extra:
        return False, None
    parsed = extra.get(PARSED)
    if parsed and name in parsed:
        return True, parsed[name]
    if name[:1] != "\x00" and name in extra and name != PARSED:
        return True, extra[name]
    return False, None


def modify_fields(extra: dict, ops: "Operations", lookup: Lookup) -> int:
    """Apply rename, copy, set, add and remove to one record's fields, in place; return the number
    of template misses."""
    misses = 0
    for old, new in ops.rename:
        found, value = _take(extra, old)
        if found:
            _parsed(extra)[new] = value
    for source, target in ops.copy:
        found, value = _get(extra, source)
        if found:
            _parsed(extra)[target] = value
    for name, value in ops.set:
        rendered = value.render(lookup) if isinstance(value, Template) else value
        if rendered is None:
            misses += 1
        else:
            _parsed(extra)[name] = rendered
    for name, value in ops.add:
        if _get(extra, name)[0]:
            continue
        rendered = value.render(lookup) if isinstance(value, Template) else value
        if rendered is None:
            misses += 1
        else:
            _parsed(extra)[name] = rendered
    for name in ops.remove:
        _take(extra, name)
    return misses


class Operations:
    __slots__ = ("rename", "copy", "set", "add", "remove", "names_message")

    def __init__(self, settings: Settings):
        self.rename = list(settings.rename.items())
        self.copy = list(settings.copy.items())
        self.set = [(name, _value(value)) for name, value in settings.set.items()]
        self.add = [(name, _value(value)) for name, value in settings.add.items()]
        self.remove = list(settings.remove)
        # A template naming the message gives each record its own result; else records sharing one
        # fields dict share the result too.
        self.names_message = any(isinstance(value, Template) and "message" in value.names
                                 for _, value in self.set + self.add)

    def __bool__(self) -> bool:
        return bool(self.rename or self.copy or self.set or self.add or self.remove)


def _value(value: Any) -> Any:
    return Template(value) if isinstance(value, str) else value


# ---------------------------------------------------------------- the filter

def _field_problems(settings: Settings, where: str) -> list[str]:
    problems = []
    for key in ("set", "add"):
        for name, value in settings.get(key, {}).items():
            if not name:
                problems.append(f"{where}.{key}: a field name cannot be empty")
            if isinstance(value, str):
                try:
                    parse_template(value)
                except TemplateError as exc:
                    problems.append(f"{where}.{key}.{name}: {exc}")
            elif not isinstance(value, (int, float, bool)):
                problems.append(f"{where}.{key}.{name}: expected a template string, a number or a boolean, "
                                f"got {type(value).__name__}")
    for key in ("rename", "copy"):
        for old, new in settings.get(key, {}).items():
            if not old or not new:
                problems.append(f"{where}.{key}: field names cannot be empty")
    # Fields are changed at the top level of what a parser found; a dotted name would silently make a
    # key "user.id" (set) or do nothing (remove). Reading a nested field (copy's source) is fine.
    changed = [("set", name) for name in settings.get("set", {})] + [("add", name) for name in settings.get("add", {})]
    changed += [("remove", name) for name in settings.get("remove", [])]
    changed += [("rename", name) for pair in settings.get("rename", {}).items() for name in pair]
    changed += [("copy", new) for new in settings.get("copy", {}).values()]
    for key, name in changed:
        if "." in name:
            problems.append(f"{where}.{key}: {name!r}: nested fields cannot be changed; name a top-level field")
    return problems


class ModifyFilter(Filter):
    OPTIONS = {
        "rename": Option("strmap", {}),
        "copy": Option("strmap", {}),
        "set": Option("table", {}),
        "add": Option("table", {}),
        "remove": Option("strlist", []),
        "tag": Option("str", None),
        "tag_regex": Option("str", None),
        "tag_field": Option("str", "message"),
        "max_tags": Option("int", 100, minimum=1, maximum=10_000),
    }

    @staticmethod
    def problems(settings: Settings, where: str) -> list[str]:
        problems = _field_problems(settings, where)
        if settings.tag is not None:
            try:
                parse_template(settings.tag)
            except TemplateError as exc:
                problems.append(f"{where}.tag: {exc}")
            if not settings.tag.strip():
                problems.append(f"{where}.tag: cannot be empty")
        if settings.tag_regex is not None:
            if settings.tag is None:
                problems.append(f"{where}.tag_regex: needs tag, the tag the matching records get")
            try:
                re.compile(settings.tag_regex, re.M)
            except re.error as exc:
                problems.append(f"{where}.tag_regex: invalid regular expression {settings.tag_regex!r}: {exc}")
        if not problems and settings.tag is None and not Operations(settings):
            problems.append(f"{where}: nothing to do; give one of rename, copy, set, add, remove or tag")
        return problems

    @staticmethod
    def agent_problems(settings: Settings, where: str, labels: dict[str, str]) -> list[str]:
        """Templates naming a label [agent.labels] does not set (known at load, unlike fields)."""
        problems = []
        templates = [(f"{where}.{key}.{name}", value) for key in ("set", "add")
                     for name, value in settings.get(key, {}).items() if isinstance(value, str)]
        if settings.tag is not None:
            templates.append((f"{where}.tag", settings.tag))
        for path, text in templates:
            try:
                parts = parse_template(text)
            except TemplateError:
                continue  # reported by problems
            for named, name in parts:
                if named and name.startswith("labels.") and name[len("labels."):] not in labels:
                    problems.append(f"{path}: {{{name}}} names a label that [agent.labels] does not set "
                                    f"(set: {', '.join(sorted(labels)) or 'none'})")
        return problems

    @staticmethod
    def summary(settings: Settings) -> str:
        parts = [f"{key} {', '.join(f'{k}={v}' for k, v in settings.get(key).items())}"
                 for key in ("rename", "copy", "set", "add") if settings.get(key)]
        if settings.remove:
            parts.append(f"remove {', '.join(settings.remove)}")
        if settings.tag is not None:
            parts.append(f"tag -> {settings.tag!r}" + (f" when {settings.tag_field} ~ {settings.tag_regex!r}"
                                                      if settings.tag_regex else ""))
        return "; ".join(parts)

    def __init__(self, settings: Settings, context: FilterContext):
        super().__init__(settings, context)
        self.ops = Operations(settings)
        self.tag = Template(settings.tag) if settings.tag is not None else None
        self.regex = LinePattern(settings.tag_regex) if settings.tag_regex is not None else None
        self.tag_field = settings.tag_field
        self.max_tags = settings.max_tags
        self._tags: set[str] = set()
        self._lock = threading.Lock()
        self._overflow_reported = False
        # Lines are cut by the tag alone (no per-record tag) when the tag is the same for the whole batch.
        self.tag_by_lines = self.tag is not None and self.tag.constant and \
            (self.regex is None or self.tag_field == "message")

    def _allowed(self, tag: str, old: str) -> str:
        """``tag`` if it may be made (bounded count and length), else ``old``."""
        if tag in self._tags:
            return tag
        with self._lock:
            if len(tag) <= MAX_TAG_CHARS and len(self._tags) < self.max_tags:
                self._tags.add(tag)
                return tag
            if not self._overflow_reported:
                self._overflow_reported = True
                log.warning("%s: not setting tag %r (more than %d distinct tags, or longer than %d characters); "
                            "such records keep their tag", self.context.name, tag[:80], self.max_tags,
                            MAX_TAG_CHARS)
        self.context.stats.add("filter_tag_overflows", 1, filter=self.context.name)
        return old

    def _missed(self, count: int) -> None:
        if count:
            self.context.stats.add("filter_template_misses", count, filter=self.context.name)

    def apply(self, batch: Batch) -> list[Batch]:
        if not batch.count:
            return [batch]
        fields = self._new_fields(batch) if self.ops else batch.fields
        if fields is not batch.fields:
            batch = derived(batch, blob=batch.blob, messages=batch.messages, fields=fields)
        if self.tag is None:
            return [batch]
        if self.tag_by_lines:
            return self._retag_lines(batch)
        return self._retag_records(batch)

    def _new_fields(self, batch: Batch) -> list[dict | None]:
        """The records' fields after rename, copy, set, add and remove. Fields dicts may be shared between
        records (the level filter's): each is copied before it changes, and while no template names the
        message a shared dict gives one shared result, so plain lines keep their fast encoding."""
        envelope, tag, source, ops = self.context.envelope, batch.tag, batch.source, self.ops
        count = batch.count
        old = batch.fields if batch.fields is not None else [None] * count
        messages = batch.message_list() if ops.names_message else None
        new: list[dict | None] = []
        results: dict[int, tuple[dict, int]] = {}  # id of a shared dict -> (its result, template misses)
        misses = 0
        for index, extra in enumerate(old):
            if messages is None:
                done = results.get(id(extra))
                if done is not None:
                    new.append(done[0])
                    misses += done[1]
                    continue
            changed = _copy(extra)
            here = modify_fields(changed, ops, Lookup(envelope, tag, source,
                                                      None if messages is None else messages[index], changed))
            misses += here
            new.append(changed)
            if messages is None:
                results[id(extra)] = (changed, here)
        self._missed(misses)
        return new

    def _retag_lines(self, batch: Batch) -> list[Batch]:
        """One tag for the whole batch, given to all its records or (tag_regex) to the lines that match."""
        tag = self.tag.render(Lookup(self.context.envelope, batch.tag, batch.source))
        if not tag:
            self._missed(batch.count)
            return [batch]
        tag = self._allowed(tag, batch.tag)
        if tag == batch.tag:
            return [batch]
        if self.regex is None:
            batch.tag = tag
            return [batch]
        if batch.blob is not None:
            data, runs = self.regex.line_spans(batch.blob)
            matched = bytearray(batch.count)
            for first, last in line_ranges(data, runs):
                matched[first:last] = b"\x01" * (last - first)
        else:
            search = self.regex.text.search
            matched = [m is not None and search(m) is not None for m in batch.messages]
        return _split(batch, matched, tag)

    def _retag_records(self, batch: Batch) -> list[Batch]:
        """A tag per record (a template naming a field or a regex group)."""
        messages = batch.message_list()
        fields = batch.fields if batch.fields is not None else [None] * len(messages)
        envelope, tag, source, template, regex, tag_field = (self.context.envelope, batch.tag, batch.source,
                                                             self.tag, self.regex, self.tag_field)
        tags: list[str] = []
        misses = 0
        for message, extra in zip(messages, fields):
            record_tag = tag
            groups = None
            found = True
            if regex is not None:
                value = message if tag_field == "message" else field_value(tag_field, message, extra, tag, source)
                match = regex.text.search(value if isinstance(value, str) else str(value)) \
                    if value is not None else None
                found = match is not None
                groups = match.groupdict() if match is not None else None
            if found:
                rendered = template.render(Lookup(envelope, tag, source, message, extra, groups))
                if rendered:
                    record_tag = self._allowed(rendered, tag)
                else:
                    misses += 1
            tags.append(record_tag)
        self._missed(misses)
        if all(t == tag for t in tags):
            return [batch]
        return _by_tag(batch, tags)


def _copy(extra: dict | None) -> dict:
    """A record's fields to change: its own dict, and its own parsed values."""
    if not extra:
        return {}
    changed = dict(extra)
    if PARSED in changed:
        changed[PARSED] = dict(changed[PARSED])
    return changed


def _split(batch: Batch, matched, tag: str) -> list[Batch]:
    """The records flagged in ``matched`` as a batch of ``tag``, the others as they were (first)."""
    if not any(matched):
        return [batch]
    rest = keep_records(batch, [not flag for flag in matched])
    moved = keep_records(batch, matched)
    moved.tag = tag
    return [rest, moved] if rest.count else [moved]


def _by_tag(batch: Batch, tags: list[str]) -> list[Batch]:
    """One batch per distinct tag, in the order the tags first appear, records in order."""
    out = []
    for tag in dict.fromkeys(tags):
        part = keep_records(batch, [t == tag for t in tags])
        if part is batch:
            part = derived(batch, blob=batch.blob, messages=batch.messages, fields=batch.fields)
        part.tag = tag
        out.append(part)
    return out


FILTER = ModifyFilter
