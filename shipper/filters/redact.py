"""The ``redact`` filter: secrets replaced before anything leaves the box.

Rules are regexes (built-in ones by name, and the user's) combined into ONE regex, an alternation
of named groups, applied with one ``re.sub`` per piece of text; the rule of a match is the group
that closed last (``match.lastindex``). Only the value of a key/value pair is replaced (the key
stays readable), by ``[REDACTED:rule]`` (mode "mask") or ``[HMAC:rule:<16 hex>]``, an HMAC-SHA256
of the value with a key from the environment (mode "hash": the same value gives the same text, so
records can still be joined on it).

Plain blobs keep their fast path: each rule names literals one of which every match contains (a
"trigger": ``AKIA`` and ``eyJ`` in the blob itself, ``passw``, ``token``, thirteen digits in a
lower-cased, digits-as-0 view), found at C speed in one hyperscan scan of the blob
(shipper.filters.literals; an sre scan per anchor byte where hyperscan is not installed). The
combined regex then runs only over the lines that hold one (one sub per run of such lines), or over
the whole blob when a rule has no trigger (a user regex without ``contains``, ipv6). Rules apply
per line: built-ins never match a newline; a user regex that does is applied line by line instead.
Messages and string fields (parsed values, an input's fields) go through the str form of the same
regex; there a private key block spans the lines of a multi-line message.

In a plain blob each line is a record: a PEM private key logged line by line is redacted from its
``-----BEGIN ... PRIVATE KEY-----`` line through the base64 lines after it, up to and including the
END line (at most MAX_PEM_LINES lines, and only while the lines look like PEM), across batches of
the same file too.

A failure here never ships a secret: the batch is dropped and counted (reason "filter_error").
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from shipper.config import Option
from shipper.filters import Filter, FilterContext, derived
from shipper.filters.grep import analyse
from shipper.filters.literals import trigger_finder, view_of
from shipper.record import PARSED, Batch

log = logging.getLogger(__name__)

MAX_PEM_LINES = 200  # an RSA 16384-bit key is about 200 lines of base64
# A body line: base64, a PEM header (encrypted keys) or a PGP armor header, or blank (PGP's separator).
_PEM_BODY_TEXT = r"[A-Za-z0-9+/=]{1,100}|(?:Proc-Type|DEK-Info|Version|Comment|Hash|Charset):[^\n]*|[ \t]*"
_PEM_END_TEXT = r"-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"  # PGP: "PRIVATE KEY BLOCK"
_PEM_BEGIN_TEXT = r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
_PEM_BODY = re.compile(_PEM_BODY_TEXT.encode())
_PEM_END = re.compile(_PEM_END_TEXT.encode())
_PEM_BEGIN = re.compile(_PEM_BEGIN_TEXT.encode())
_PEM_BODY_STR = re.compile(_PEM_BODY_TEXT)
_PEM_END_STR = re.compile(_PEM_END_TEXT)
_PEM_BEGIN_STR = re.compile(_PEM_BEGIN_TEXT)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str                 # one line's regex; groups named v, v2 hold the value to replace
    triggers: tuple = ()         # literals of the view (literals.VIEW_TABLE): every match holds one; () = none known
    raw_triggers: tuple = ()     # or literals of the line itself (case-sensitive rules: AKIA, eyJ)
    opt_in: bool = False
    check: Callable[[str], bool] | None = None  # a match is a secret only if this says so (Luhn)
    text_pattern: str | None = None  # the form for messages, when it differs (spans lines)
    field_name: str | None = None    # a field named so holds a secret whole (a parsed "password")
    per_line: bool = False           # a user regex that is not chunk-safe (\A, \Z, lookarounds): line by line


def luhn(digits: str) -> bool:
    """The Luhn checksum of a card number (separators ignored)."""
    numbers = [ord(c) - 48 for c in digits if "0" <= c <= "9"]
    if not 13 <= len(numbers) <= 19:
        return False
    total = 0
    for index, number in enumerate(reversed(numbers)):
        if index % 2:
            number *= 2
            if number > 9:
                number -= 9
        total += number
    return total % 10 == 0


def card(value: str) -> bool:
    """A card number: a real issuer prefix (IIN) with that brand's lengths, and the Luhn check. Random
    13-19 digit numbers (epoch-ms times start with 1, ids) mostly have no such prefix."""
    number = "".join(c for c in value if "0" <= c <= "9")
    size = len(number)
    if not 13 <= size <= 19:
        return False
    two, three, four = int(number[:2]), int(number[:3]), int(number[:4])
    if number[0] == "4":                                    # Visa
        fits = size in (13, 16, 19)
    elif 51 <= two <= 55 or 2221 <= four <= 2720:           # Mastercard
        fits = size == 16
    elif two in (34, 37):                                   # American Express
        fits = size == 15
    elif four == 6011 or two == 65 or 644 <= three <= 649:  # Discover
        fits = size >= 16
    elif 3528 <= four <= 3589:                              # JCB
        fits = size >= 16
    elif two in (36, 38, 39) or 300 <= three <= 305:        # Diners Club
        fits = size >= 14
    elif two == 62:                                         # UnionPay
        fits = size >= 16
    else:
        return False
    return fits and luhn(number)


# The end of a key: its closing quote (escaped too: a JSON document inside a JSON string), "=" or ":".
_KEY_END = r"""(?:\\?["'])?[ \t]*[=:][ \t]*"""
# A value: a quoted string (its inside is replaced, the quotes stay; unterminated: to the line's end),
# an escaped-quoted one (\"hunter2\" inside a JSON string), or a bare word up to a delimiter (it may
# start with a bracket: <secret>, {secret}, (secret)); a flat JSON object or array under the key, whole.
_VALUE = (r"""(?:"(?P<v>(?:[^"\\\n]|\\[^\n]?)+)(?:"|$)|'(?P<v2>[^'\n]+)'?"""
          r"""|\\"(?P<v4>(?:[^"\\\n]|\\[^"\n])+?)(?:\\"|$)"""
          r"""|(?P<v6>\{[^{}\n]*\}|\[[^\[\]\n]*\])|(?P<v3>[<{(\[]*[^\s"',;&}{)\]<>]+))""")
# A key's start: not inside a word, or at a case change (userPassword, accessToken, clientSecret).
_KEY_START = r"(?:(?<![A-Za-z0-9])|(?<=[a-z0-9])(?=[A-Z]))"
_SECRET_WORDS = r"password|passwd|passphrase|pwd|secrets?|token|api[_-]?key|pass"

BUILTIN: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("aws_access_key_id", r"(?P<v>A(?<![A-Za-z0-9]A)(?:KIA|SIA)[A-Z2-7]{16})(?![A-Za-z0-9])",
         raw_triggers=(b"AKIA", b"ASIA")),
    Rule("aws_secret_key",
         r"(?i:(?:aws_?)?secret_?(?:access_?)?key)" + _KEY_END + r"""(?:\\?["'])?(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])""",
         (b"secret",), field_name=r"(?i)(?:aws_?)?secret_?(?:access_?)?key"),
    Rule("bearer", r"(?<![A-Za-z0-9])(?i:bearer)[ \t]+(?P<v>[A-Za-z0-9\-._~+/]{12,}=*)", (b"bearer",)),
    Rule("jwt", r"(?P<v>e(?<![A-Za-z0-9_-]e)yJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*)",
         raw_triggers=(b"eyJ",)),
    Rule("private_key", _PEM_BEGIN_TEXT + r"[^\n]*?(?:" + _PEM_END_TEXT + "|$)",
         raw_triggers=(b"PRIVATE KEY",),
         text_pattern=_PEM_BEGIN_TEXT + r"[\s\S]*?(?:" + _PEM_END_TEXT + r"|\Z)"),
    Rule("password",
         # The key from its keyword on ("access_token", "x-api-key" match at "token", "api"): no
         # quantifier before the keyword, which would cost a try at every word start.
         _KEY_START + r"(?:(?i:" + _SECRET_WORDS + r")" + _KEY_END + _VALUE
         # Authorization: Basic <base64 of user:password> (Bearer is the bearer rule's)
         + r"|(?i:authorization)" + _KEY_END + r"""(?:\\?["'])?(?i:basic)[ \t]+(?P<v5>[A-Za-z0-9+/]+=*))""",
         # (literals with a rare letter: "pwd" found at its "w", "token" at its "k", "authorization" at its "z")
         (b"pass", b"pwd", b"secret", b"token", b"api key", b"apikey", b"basic"),
         # a name ending in the keyword, after "_", "-", "." or a case change (db_password, userPassword)
         field_name=r"(?:[A-Za-z0-9_.-]*(?:[_.-]|[a-z0-9](?=[A-Z])))?(?i:" + _SECRET_WORDS + r"|authorization)"),
    Rule("credit_card",
         # The first digit before the look-behind: the engine then skips to digits at C speed.
         r"(?P<v>[0-9](?<![0-9][0-9])(?:[0-9]{12,18}|[0-9]{3}(?:[ -][0-9]{4}){2}[ -][0-9]{1,4}(?:[ -][0-9]{3})?"
         r"|[0-9]{3}[ -][0-9]{6}[ -][0-9]{4,5}))(?![0-9])",
         # 13 digits at least, in a row or in groups (4-4-4-x, Amex 4-6-5): hex ids, times and sizes
         # rarely hold that many, so the card regex runs on few lines.
         (b"0" * 13, b"0000 0000 0000 0", b"0000 000000 0000"), check=card),
    Rule("email", r"(?<![A-Za-z0-9._%+-])(?P<v>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})",
         (b"@",), opt_in=True),
    Rule("ipv4", r"(?<![0-9.])(?P<v>(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                 r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(?![0-9]|\.[0-9])",
         (b"0.0",), opt_in=True),
    Rule("ipv6", r"(?<![0-9A-Fa-f:])(?P<v>(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
                 r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?"
                 r"|::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?)(?![0-9A-Fa-f:])",
         (), opt_in=True),
)}
DEFAULT_PATTERNS = tuple(name for name, rule in BUILTIN.items() if not rule.opt_in)
_VALUE_GROUPS = ("v", "v2", "v3", "v4", "v5", "v6")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_GROUP = re.compile(r"\(\?P<([A-Za-z_][A-Za-z0-9_]*)>")
_GROUP_REF = re.compile(r"\(\?P=([A-Za-z_][A-Za-z0-9_]*)\)")
_NUMBERED_REF = re.compile(r"(?<!\\)(?:\\\\)*\\(?:[1-9]|g<[0-9]+>)")


def user_rule(name: str, pattern: str, contains: list[str]) -> Rule:
    """A user's rule: named groups renamed into the rule's own space; a group named ``value`` is what
    gets replaced (else the whole match)."""
    def rename(match: re.Match) -> str:
        group = match.group(1)
        return "(?P<v>" if group == "value" else f"(?P<u_{group}>"

    renamed = _GROUP.sub(rename, _scope_flags(pattern))
    renamed = _GROUP_REF.sub(lambda m: "(?P=v)" if m.group(1) == "value" else f"(?P=u_{m.group(1)})", renamed)
    try:  # \A, \Z and lookarounds see other lines in a blob: such a rule is applied line by line
        per_line = not analyse(pattern)[0]
    except Exception:  # noqa: BLE001 - refused by rule_problems anyway; line by line is the safe side
        per_line = True
    return Rule(name, renamed, tuple(view_of(literal.encode()) for literal in contains), per_line=per_line)


_GLOBAL_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")


def _scope_flags(pattern: str) -> str:
    """``(?i)abc`` as ``(?i:abc)``: global flags are refused inside the combined regex."""
    flags = ""
    while match := _GLOBAL_FLAGS.match(pattern):
        flags += match.group(1)
        pattern = pattern[match.end():]
    return f"(?{flags}:{pattern})" if flags else pattern


def rule_problems(name: Any, pattern: Any, contains: Any, where: str) -> list[str]:
    """What is wrong with one user rule, each naming its key."""
    problems = []
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        problems.append(f"{where}.name: expected a lower-case name like \"order_token\" (letters, digits, _)")
    elif name in BUILTIN:
        problems.append(f"{where}.name: {name!r} is a built-in pattern: list it in patterns instead, or pick another name")
    if not isinstance(pattern, str) or not pattern:
        problems.append(f"{where}.pattern: required, a regular expression")
        return problems
    if _NUMBERED_REF.search(pattern):
        problems.append(f"{where}.pattern: numbered back-references (\\1) cannot be combined with other rules; "
                        f"use a named group (?P<x>...) and (?P=x)")
        return problems
    try:
        compiled = re.compile(pattern.encode(), re.MULTILINE)
        re.compile(pattern, re.MULTILINE | re.ASCII)
    except (re.error, UnicodeEncodeError, OverflowError, RecursionError) as exc:
        problems.append(f"{where}.pattern: invalid regular expression: {exc}")
        return problems
    if compiled.fullmatch(b"") is not None or compiled.search(b"x") is not None and compiled.search(b"x").end() == 0:
        problems.append(f"{where}.pattern: matches the empty string (it would redact between every character)")
    if not isinstance(contains, list) or not all(isinstance(c, str) and c for c in contains):
        problems.append(f"{where}.contains: expected a list of non-empty strings")
    return problems


class _Combined:
    """Some rules as one regex (bytes, for blobs) and its str twin (for messages and fields)."""

    def __init__(self, rules: list[Rule], text: bool):
        parts = [_scoped(rule.text_pattern if text and rule.text_pattern else rule.pattern, index)
                 for index, rule in enumerate(rules)]
        joined = "|".join(parts)
        self.regex = re.compile(joined, re.MULTILINE | re.ASCII) if text else re.compile(joined.encode(), re.MULTILINE)
        self.per_line = any(rule.per_line for rule in rules)
        groups = self.regex.groupindex
        # The group that closes last in a match is its rule's outer group: match.lastindex.
        self.rule_of = {groups[f"r{index}"]: (rule, tuple(groups[f"r{index}_{v}"] for v in _VALUE_GROUPS
                                                          if f"r{index}_{v}" in groups))
                        for index, rule in enumerate(rules)}


class Redactor:
    """The compiled rules: pure functions of text, no I/O (the filter counts and keeps state)."""

    def __init__(self, rules: list[Rule], allow: list[str] = (), mode: str = "mask", key: bytes | None = None,
                 engine: str | None = None):
        self.rules = rules
        self.mode = mode
        self.key = key
        self.combined = _Combined(rules, False)
        self.text_combined = _Combined(rules, True)
        self._subsets: dict[int, _Combined] = {}  # bit mask of rules -> their regex (the rules a span triggers)
        # Each allow regex on its own (flags like (?i) stay valid); values are few, so a loop is cheap.
        self.allow = _Allow([re.compile(a, re.ASCII) for a in allow]) if allow else None
        # Each distinct literal once, with the rules it stands for.
        view: dict[bytes, int] = {}
        raw: dict[bytes, int] = {}
        for index, rule in enumerate(rules):
            for trigger in rule.triggers:
                view[trigger] = view.get(trigger, 0) | 1 << index
            for trigger in rule.raw_triggers:
                raw[trigger] = raw.get(trigger, 0) | 1 << index
        self.finder = trigger_finder(raw, view, engine) if raw or view else None
        # A rule without trigger: search everything.
        self.whole = any(not rule.triggers and not rule.raw_triggers for rule in rules)
        self.user_rules = any(rule.name not in BUILTIN for rule in rules)
        self.pem = "private_key" in {rule.name for rule in rules}
        self._masks = {rule.name: f"[REDACTED:{rule.name}]" for rule in rules}
        self._lock = threading.Lock()
        self.field_names = [(re.compile(rule.field_name), rule.name) for rule in rules if rule.field_name]
        # field name -> (the rule of a name that holds a secret whole, whether the name itself is clean):
        # names repeat in every record, so they are looked at once
        self._names: dict[str, tuple[str | None, bool]] = {}

    def name_info(self, name: str) -> tuple[str | None, bool]:
        """(rule, clean) of a field name: the rule when its value is a secret whole (``password``), else
        None; clean False when the name itself holds a secret (``{"AKIA...": 1}``)."""
        info = self._names.get(name)
        if info is None:
            rule = next((rule for pattern, rule in self.field_names if pattern.fullmatch(name)), None)
            info = (rule, not name or self.text(name, {}) == name)
            if len(self._names) < 4096:
                self._names[name] = info
        return info

    def secret_name(self, name: str) -> str | None:
        """The rule of a field whose name says it holds a secret whole (``password``), else None."""
        return self.name_info(name)[0]

    def whole_value(self, rule: str, value: Any, counts: dict[str, int]) -> Any:
        """A value under a secret-named field, replaced whole whatever its type (a number, a table,
        a list); None, booleans, "" and values redacted already stay."""
        if value is None or value is True or value is False or value == "":
            return value
        text = value if isinstance(value, str) else str(value)
        if text.startswith(("[REDACTED:", "[HMAC:")) or (self.allow is not None and self.allow.fullmatch(text)):
            return value
        counts[rule] = counts.get(rule, 0) + 1
        return self.replacement(rule, text)

    def field(self, name, value: str, counts: dict[str, int]) -> str:
        """A string field's value: whole when its name says it is a secret (``password``), else as text."""
        rule = self.secret_name(name) if isinstance(name, str) else None
        if rule is not None:
            return self.whole_value(rule, value, counts)
        return self.text(value, counts) if value else value

    # ------------------------------------------------------------ one value

    def replacement(self, rule: str, value: str) -> str:
        if self.mode == "hash":
            digest = hmac.new(self.key or b"", value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
            return f"[HMAC:{rule}:{digest[:16]}]"
        return self._masks.get(rule) or f"[REDACTED:{rule}]"

    def _replacer(self, combined: _Combined, counts: dict[str, int], as_bytes: bool):
        rule_of, allow = combined.rule_of, self.allow

        def replace(match: re.Match):
            rule, values = rule_of[match.lastindex]
            whole = match[0]
            start, end = match.span()
            for group in values:
                if match.start(group) != -1:
                    start, end = match.span(group)
                    break
            offset = match.start()
            value = whole[start - offset:end - offset]
            if as_bytes:
                if 10 in whole:  # a user regex crossed a line: apply it line by line instead
                    raise _Crossed
                value = value.decode("utf-8", "replace")
            if value.startswith(("[REDACTED:", "[HMAC:")):  # redacted already (a second redact filter)
                return whole
            if rule.check is not None and not rule.check(value):
                return whole
            if allow is not None and allow.fullmatch(value):
                return whole
            counts[rule.name] = counts.get(rule.name, 0) + 1
            text = self.replacement(rule.name, value)
            return whole[:start - offset] + (text.encode() if as_bytes else text) + whole[end - offset:]

        return replace

    # ------------------------------------------------------------ text (messages, fields)

    def text(self, value: str, counts: dict[str, int]) -> str:
        return self.text_combined.regex.sub(self._replacer(self.text_combined, counts, False), value)

    # ------------------------------------------------------------ blobs

    def blob(self, blob: bytes, counts: dict[str, int]) -> bytes:
        """A blob of complete lines with every rule applied to each line (same number of lines)."""
        spans = None if self.whole else self.candidate_lines(blob)
        if spans is None:
            return self._lines(self.combined, blob, counts)
        if not spans:
            return blob
        pieces, last = [], 0
        for start, end, mask in spans:
            pieces.append(blob[last:start])
            pieces.append(self._lines(self._subset(mask), blob[start:end], counts))
            last = end
        pieces.append(blob[last:])
        return b"".join(pieces)

    def _subset(self, mask: int) -> _Combined:
        """The regex of the rules in ``mask``: on a line holding only a card-like number, the card rule
        alone runs (the others cannot match there: none of their triggers is on the line)."""
        combined = self._subsets.get(mask)
        if combined is None:
            combined = _Combined([rule for index, rule in enumerate(self.rules) if mask >> index & 1], False)
            with self._lock:
                if len(self._subsets) < 256:
                    self._subsets[mask] = combined
        return combined

    def candidate_lines(self, blob: bytes) -> list[tuple[int, int, int]] | None:
        """The byte ranges of the runs of lines holding a trigger, with the rules they trigger (a bit
        mask); None when many lines do (one sub over everything is then cheaper)."""
        limit = max(64, len(blob) // 1024)  # about a line in 5 (the count of lines is not worth a scan)
        found = self.finder.hits(blob, limit) if self.finder is not None else []
        if found is None:
            return None
        if not found:
            return []
        found.sort()
        spans: list[tuple[int, int, int]] = []
        for at, mask in found:
            if spans and at < spans[-1][1]:  # on a line already taken
                start, end, masks = spans[-1]
                spans[-1] = (start, end, masks | mask)
                continue
            start = blob.rfind(b"\n", 0, at) + 1
            end = blob.index(b"\n", at) + 1
            if spans and start == spans[-1][1]:  # the next line: one run
                spans[-1] = (spans[-1][0], end, spans[-1][2] | mask)
            else:
                spans.append((start, end, mask))
        return spans

    def _lines(self, combined: _Combined, piece: bytes, counts: dict[str, int]) -> bytes:
        """The regex over complete lines; a match across a newline (a user regex) means line by line."""
        trial: dict[str, int] = {}
        try:
            if combined.per_line:
                raise _Crossed
            result = combined.regex.sub(self._replacer(combined, trial, True), piece)
        except _Crossed:
            trial = {}
            replace = self._replacer(combined, trial, True)
            try:
                result = b"\n".join([combined.regex.sub(replace, line) for line in piece.split(b"\n")])
            except _Crossed:  # cannot happen: a line has no newline to cross
                raise RuntimeError("a redact rule matched a newline inside one line") from None
        if self.user_rules and not result.isascii():
            try:
                result.decode("utf-8")
            except UnicodeDecodeError:  # a user regex cut a character: apply the text form instead
                trial = {}
                text = piece.decode("utf-8")
                result = "\n".join(self.text(line, trial) for line in text.split("\n")).encode("utf-8")
        for name, number in trial.items():
            counts[name] = counts.get(name, 0) + number
        return result

    def pem_blocks(self, original: bytes, blob: bytes, open_lines: int, counts: dict[str, int]) -> tuple[bytes, int]:
        """The lines after a BEGIN ... PRIVATE KEY line of ``original`` (one without its END on the same
        line), or still open from the previous batch (``open_lines`` > 0), replaced in ``blob`` (the
        same lines, redacted) up to the END line, while they look like PEM. Returns the blob and the
        lines of a block still open at its end (0: none)."""
        out: list[bytes] = []
        changed = False
        lines = original.split(b"\n")
        lines.pop()
        inside = open_lines
        for line, redacted in zip(lines, blob.split(b"\n")):
            if inside:
                ends = _PEM_END.search(line) is not None
                if ends or _PEM_BODY.fullmatch(line):
                    out.append(self.replacement("private_key", line.decode("utf-8", "replace")).encode())
                    counts["private_key"] = counts.get("private_key", 0) + 1
                    changed = True
                    inside = 0 if ends or inside >= MAX_PEM_LINES else inside + 1
                    continue
                inside = 0
            out.append(redacted)
            if b"PRIVATE KEY" in line:
                begin = None
                for begin in _PEM_BEGIN.finditer(line):
                    pass
                if begin is not None and not _PEM_END.search(line, begin.end()):
                    inside = 1
        if not changed:
            return blob, inside
        out.append(b"")
        return b"\n".join(out), inside


    def pem_messages(self, messages: list, open_lines: int, counts: dict[str, int]) -> tuple[list, int]:
        """The messages of a general batch redacted, with the lines of a private key block that spans
        records (one line per record: parser json/regex, multiline events of one line) replaced, like
        ``pem_blocks`` does for a blob. Returns the messages and the lines of a block left open."""
        text = self.text
        out = []
        inside = open_lines
        for message in messages:
            if not isinstance(message, str):
                out.append(message)
                continue
            rest = message
            head = None
            if inside:
                lines = message.split("\n")
                used = 0
                for line in lines:
                    if inside > MAX_PEM_LINES:
                        inside = 0
                        break
                    if _PEM_END_STR.search(line):
                        used += 1
                        inside = 0
                        break
                    if not _PEM_BODY_STR.fullmatch(line):
                        inside = 0
                        break
                    used += 1
                    inside += 1
                if used:
                    counts["private_key"] = counts.get("private_key", 0) + 1
                    head = self.replacement("private_key", "\n".join(lines[:used]))
                    rest = "\n".join(lines[used:]) if used < len(lines) else None
            if rest is not None:
                if "PRIVATE KEY" in rest:
                    begin = None
                    for begin in _PEM_BEGIN_STR.finditer(rest):
                        pass
                    if begin is not None and not _PEM_END_STR.search(rest, begin.end()):
                        inside = 1
                rest = text(rest, counts)
            out.append(head if rest is None else rest if head is None else head + "\n" + rest)
        return out, inside


class _Allow:
    """The allow list: a value matching one of the regexes whole is never redacted."""

    def __init__(self, patterns: list[re.Pattern]):
        self.patterns = patterns

    def fullmatch(self, value: str) -> bool:
        return any(pattern.fullmatch(value) for pattern in self.patterns)


class _Crossed(Exception):
    """A match of the blob regex holds a newline."""


def _scoped(pattern: str, index: int) -> str:
    """One rule's pattern as a group of the combined regex: (?P<r3>...) with its groups renamed r3_x."""
    inner = _GROUP.sub(lambda m: f"(?P<r{index}_{m.group(1)}>", pattern)
    inner = _GROUP_REF.sub(lambda m: f"(?P=r{index}_{m.group(1)})", inner)
    return f"(?P<r{index}>{inner})"


def rules_of(settings) -> list[Rule]:
    names = settings.patterns if settings.patterns is not None else list(DEFAULT_PATTERNS)
    if "all" in names:
        names = list(BUILTIN)
    rules = [BUILTIN[name] for name in dict.fromkeys(names) if name in BUILTIN]
    for item in settings.custom:
        rules.append(user_rule(item["name"], item["pattern"], list(item.get("contains", []))))
    return rules


def _patterns_check(value: Any) -> str | None:
    unknown = [name for name in value if name not in BUILTIN and name != "all"]
    if unknown:
        return (f"unknown pattern {unknown[0]!r}; built-in: {', '.join(BUILTIN)} (\"all\": every one, "
                f"opt-in ones too; default: {', '.join(DEFAULT_PATTERNS)})")
    return None


class RedactFilter(Filter):
    """Replaces secrets in messages and string fields; counts redactions{filter=, rule=}."""

    OPTIONS = {
        "patterns": Option("strlist", None, check=_patterns_check),  # None: DEFAULT_PATTERNS; "all": every one
        "custom": Option("list", []),     # [{ name = "...", pattern = '...', contains = ["..."] }]
        "allow": Option("strlist", []),   # values never redacted (full-match regexes)
        "mode": Option("choice", "mask", choices=("mask", "hash")),
        "hash_key_env": Option("str", ""),
        "fields": Option("bool", True),   # string fields too, not only the message
    }

    @staticmethod
    def problems(settings, where: str) -> list[str]:
        problems = []
        names = set()
        for index, item in enumerate(settings.custom):
            at = f"{where}.custom[{index}]"
            if not isinstance(item, dict):
                problems.append(f"{at}: expected a table {{ name = \"...\", pattern = '...' }}")
                continue
            unknown = set(item) - {"name", "pattern", "contains"}
            if unknown:
                problems.append(f"{at}.{sorted(unknown)[0]}: unknown key (known: name, pattern, contains)")
            problems.extend(rule_problems(item.get("name"), item.get("pattern"), item.get("contains", []), at))
            if item.get("name") in names:
                problems.append(f"{at}.name: {item.get('name')!r} is used twice")
            names.add(item.get("name"))
        for index, allowed in enumerate(settings.allow):
            try:
                re.compile(allowed, re.ASCII)
            except (re.error, OverflowError, RecursionError) as exc:
                problems.append(f"{where}.allow[{index}]: invalid regular expression {allowed!r}: {exc}")
        if not problems:
            for index, item in enumerate(settings.custom):  # each alone inside a combined regex
                try:
                    rule = user_rule(item["name"], item["pattern"], list(item.get("contains", [])))
                    _Combined([rule], False)
                    _Combined([rule], True)
                except (re.error, OverflowError, RecursionError, AssertionError) as exc:
                    problems.append(f"{where}.custom[{index}].pattern: {item['pattern']!r} cannot be combined with "
                                    f"the other rules: {getattr(exc, 'msg', exc)} (flags in the middle: use a scoped "
                                    f"group like (?i:...))")
        if settings.mode == "hash":
            variable = settings.hash_key_env
            if not variable:
                problems.append(f"{where}.hash_key_env: required with mode = \"hash\": the name of the environment "
                                f"variable holding the HMAC key (e.g. \"SHIPPER_REDACT_KEY\")")
            elif not os.environ.get(variable):
                problems.append(f"{where}.hash_key_env: the environment variable {variable} is not set or empty "
                                f"(mode = \"hash\" needs its secret key; set it in the service's environment)")
        elif settings.hash_key_env:
            problems.append(f"{where}.hash_key_env: only used with mode = \"hash\"")
        if not problems:
            rules = rules_of(settings)
            if not rules:
                problems.append(f"{where}.patterns: no rule at all (list built-in patterns or add custom ones)")
            else:
                try:
                    Redactor(rules, settings.allow)
                except (re.error, OverflowError, RecursionError, AssertionError) as exc:
                    problems.append(f"{where}.custom: the rules cannot be combined into one regex: {exc}")
        return problems

    @staticmethod
    def summary(settings) -> str:
        return f"{', '.join(rule.name for rule in rules_of(settings))}; {settings.mode}"

    def __init__(self, settings, context: FilterContext):
        super().__init__(settings, context)
        key = os.environ.get(settings.hash_key_env, "").encode() if settings.mode == "hash" else None
        self.redactor = Redactor(rules_of(settings), settings.allow, settings.mode, key)
        self.in_fields = settings.fields
        self._pem_open: dict[tuple, int] = {}  # (source, origin) -> lines into a private key block left open
        self._lock = threading.Lock()

    def apply(self, batch: Batch) -> list[Batch]:
        try:
            counts: dict[str, int] = {}
            self._redact(batch, counts)
        except Exception:  # never ship what may hold a secret: drop it, counted
            log.exception("%s: cannot redact %d records of %s at offset %d; they are dropped", self.context.name,
                          batch.count, batch.source or batch.tag, batch.start)
            self.context.dropped("filter_error", batch.count, batch.tag)
            return [derived(batch, messages=[])]
        for rule, number in counts.items():
            self.context.stats.add("redactions", number, filter=self.context.name, rule=rule)
        return [batch]

    def _redact(self, batch: Batch, counts: dict[str, int]) -> None:
        redactor = self.redactor
        # A private key block logged line by line spans records and reads, whatever their form (a
        # plain blob, or messages when a read held an invalid byte or an over-long line, or came
        # through a parser): one state per file, taken by every batch of it (so none is left stale).
        key = (batch.source, batch.origin) if redactor.pem and batch.source is not None else None
        open_lines = 0
        if key is not None:
            with self._lock:
                open_lines = self._pem_open.pop(key, 0)
        if batch.blob is not None:
            blob = redactor.blob(batch.blob, counts)
            if key is not None and (open_lines or b"PRIVATE KEY" in batch.blob):
                blob, open_lines = redactor.pem_blocks(batch.blob, blob, open_lines, counts)
            if blob is not batch.blob:
                batch.blob = blob
                batch.size = len(blob)
        elif batch.messages is not None:
            if key is not None:
                batch.messages, open_lines = redactor.pem_messages(batch.messages, open_lines, counts)
            else:
                text = redactor.text
                batch.messages = [text(m, counts) if isinstance(m, str) else m for m in batch.messages]
        if open_lines:
            with self._lock:
                self._pem_open[key] = open_lines
        if batch.fields is not None and self.in_fields:
            batch.fields = self._fields(batch.fields, counts)
        batch._ndjson = None

    def _fields(self, fields: list[dict | None], counts: dict[str, int]) -> list[dict | None]:
        done: dict[int, dict | None] = {}  # shared dicts (a blob's) are redacted once
        keep = []
        out = []
        for extra in fields:
            if not extra:
                out.append(extra)
                continue
            new = done.get(id(extra))
            if new is None:
                new = done[id(extra)] = _redact_value(extra, self.redactor, counts, 0, True)
                keep.append(extra)
            out.append(new)
        return out


MAX_DEPTH = 32
_CARD_FLOOR = 10 ** 12  # an integer of 13 digits or more may be a card number


def _redact_value(value: Any, redactor: Redactor, counts: dict[str, int], depth: int, top: bool = False) -> Any:
    """A fields value with every string (and long integer) redacted, and every value under a
    secret-named key replaced whole; the same object when nothing changed (copy on write). At the
    top, the agent's own keys (NUL-led: time, flags) are left alone."""
    if isinstance(value, str):
        return redactor.text(value, counts) if value else value
    if isinstance(value, int):
        if (value >= _CARD_FLOOR or value <= -_CARD_FLOOR) and value is not True:
            text = str(value)
            new = redactor.text(text, counts)
            return value if new == text else new
        return value
    if not isinstance(value, (dict, list)):
        return value
    if depth > MAX_DEPTH:  # nested deeper than any parser makes: not searched, so never shipped
        counts["too_deep"] = counts.get("too_deep", 0) + 1
        return "[REDACTED:too_deep]"
    if isinstance(value, dict):
        changed = None
        name_info = redactor.name_info
        for key, item in value.items():
            new_key = key
            if isinstance(key, str):
                if top and key[:1] == "\x00":
                    if key != PARSED:
                        continue
                    rule, clean = None, True
                else:
                    rule, clean = name_info(key)
                new = redactor.whole_value(rule, item, counts) if rule is not None else \
                    _redact_value(item, redactor, counts, depth + 1)
                if not clean:
                    new_key = redactor.text(key, counts)  # a secret used as a key ({"AKIA...": ...})
            else:
                new = _redact_value(item, redactor, counts, depth + 1)
            if new_key != key:
                if changed is None:
                    changed = dict(value)
                changed.pop(key, None)
                changed[new_key] = new
            elif new is not item and new != item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed
    items = [_redact_value(item, redactor, counts, depth + 1) for item in value]
    return value if all(a is b or a == b for a, b in zip(items, value)) else items


FILTER = RedactFilter
