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
stay a blob when only the tag changes by a template the whole batch shares (lines cut by ``tag_regex``
as grep cuts them); otherwise they become records with fields. Records split by tag go on as one batch
per tag, in order. At most ``max_tags`` distinct tags are made (a regex group from the content must not
make a tag per line): past that, records keep their tag.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from shipper.config import Option, Settings
from shipper.filters import Filter, FilterContext, derived, field_value
from shipper.filters.grep import LinePattern
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
    __slots__ = ("rename", "copy", "set", "add", "remove")

    def __init__(self, settings: Settings):
        self.rename = list(settings.rename.items())
        self.copy = list(settings.copy.items())
        self.set = [(name, _value(value)) for name, value in settings.set.items()]
        self.add = [(name, _value(value)) for name, value in settings.add.items()]
        self.remove = list(settings.remove)

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
        # Plain lines stay a blob when nothing but a batch-wide tag changes (cut by a regex on the message).
        self.blob_ok = (not self.ops and self.tag is not None and self.tag.constant
                        and (self.regex is None or self.tag_field == "message"))

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

    def apply(self, batch: Batch) -> list[Batch]:
        if not batch.count:
            return [batch]
        if batch.blob is not None and self.blob_ok:
            return self._retag_blob(batch)
        return self._modify_records(batch)

    def _retag_blob(self, batch: Batch) -> list[Batch]:
        tag = self.tag.render(Lookup(self.context.envelope, batch.tag, batch.source))
        if tag is None or not tag:
            self.context.stats.add("filter_template_misses", batch.count, filter=self.context.name)
            return [batch]
        tag = self._allowed(tag, batch.tag)
        if tag == batch.tag:
            return [batch]
        if self.regex is None:
            batch.tag = tag
            return [batch]
        data, runs = self.regex.line_spans(batch.blob)
        if not runs:
            return [batch]
        matched = data[:0].join([data[start:end] for start, end in runs])
        rest, position = [], 0
        for start, end in runs:
            rest.append(data[position:start])
            position = end
        rest.append(data[position:])
        rest_data = data[:0].join(rest)
        if isinstance(data, str):
            matched, rest_data = matched.encode("utf-8"), rest_data.encode("utf-8")
        out = [derived(batch, blob=rest_data)] if rest_data else []
        out.append(derived(batch, blob=matched, tag=tag))
        return out

    def _modify_records(self, batch: Batch) -> list[Batch]:
        messages = batch.message_list()
        fields = batch.fields if batch.fields is not None else [None] * len(messages)
        envelope, tag, source = self.context.envelope, batch.tag, batch.source
        ops, tag_template, regex, tag_field = self.ops, self.tag, self.regex, self.tag_field
        new_fields: list[dict | None] = []
        tags: list[str] = []
        misses = 0
        for message, extra in zip(messages, fields):
            if ops:
                extra = {} if extra is None else extra  # in place: the batch is this filter's to change
                misses += modify_fields(extra, ops, Lookup(envelope, tag, source, message, extra))
            new_fields.append(extra)
            record_tag = tag
            if tag_template is not None:
                groups = None
                matched = True
                if regex is not None:
                    value = message if tag_field == "message" else field_value(tag_field, message, extra, tag, source)
                    found = regex.text.search(value if isinstance(value, str) else str(value)) \
                        if value is not None else None
                    matched = found is not None
                    groups = found.groupdict() if found is not None else None
                if matched:
                    rendered = tag_template.render(Lookup(envelope, tag, source, message, extra, groups))
                    if rendered:
                        record_tag = self._allowed(rendered, tag)
                    else:
                        misses += 1
            tags.append(record_tag)
        if misses:
            self.context.stats.add("filter_template_misses", misses, filter=self.context.name)
        keep_fields = None if batch.fields is None and not ops else new_fields
        if all(t == tag for t in tags):
            if batch.blob is None and keep_fields is batch.fields:
                return [batch]
            return [derived(batch, messages=messages, fields=keep_fields)]
        order: dict[str, tuple[list, list]] = {}
        for message, extra, record_tag in zip(messages, new_fields, tags):
            group = order.get(record_tag)
            if group is None:
                group = order[record_tag] = ([], [])
            group[0].append(message)
            group[1].append(extra)
        return [derived(batch, messages=group_messages, fields=None if keep_fields is None else group_fields,
                        tag=record_tag) for record_tag, (group_messages, group_fields) in order.items()]


FILTER = ModifyFilter
