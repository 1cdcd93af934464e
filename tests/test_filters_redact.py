"""The redact filter: each built-in rule, the blob path against the line-by-line rule (hypothesis),
user rules, the allow list, hashing, fields, private key blocks across lines, failures, config errors."""

import hashlib
import hmac
import threading

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import one_filter_config
from shipper.errors import ConfigError
from shipper.filters import FilterContext
from shipper.filters.literals import ENGINES, VIEW_FREQUENCY, VIEW_TABLE, ReFinder, trigger_finder
from shipper.filters.redact import BUILTIN, DEFAULT_PATTERNS, RedactFilter, Redactor, card, luhn, rules_of
from shipper.record import PARSED, Batch, Envelope
from shipper.stats import Stats

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"

CASES = [  # (rule, line, redacted line)
    ("aws_access_key_id", "key AKIAIOSFODNN7EXAMPLE used", "key [REDACTED:aws_access_key_id] used"),
    ("aws_access_key_id", "sts ASIAY34FZKBOKMUTVV7A ok", "sts [REDACTED:aws_access_key_id] ok"),
    ("aws_secret_key", f"aws_secret_access_key={SECRET_KEY}", "aws_secret_access_key=[REDACTED:aws_secret_key]"),
    ("aws_secret_key", f"AWS_SECRET_ACCESS_KEY: {SECRET_KEY}", "AWS_SECRET_ACCESS_KEY: [REDACTED:aws_secret_key]"),
    ("aws_secret_key", f'{{"SecretAccessKey":"{SECRET_KEY}"}}', '{"SecretAccessKey":"[REDACTED:aws_secret_key]"}'),
    ("bearer", "Authorization: Bearer abcdef0123456789xyz", "Authorization: Bearer [REDACTED:bearer]"),
    ("jwt", f"session {JWT} end", "session [REDACTED:jwt] end"),
    ("password", "login user=bob password=hunter2 ok", "login user=bob password=[REDACTED:password] ok"),
    ("password", '{"user":"bob","passwd":"two words"}', '{"user":"bob","passwd":"[REDACTED:password]"}'),
    ("password", "pwd: 's3cr3t' then", "pwd: '[REDACTED:password]' then"),
    ("password", "client_secret=abc&x=1", "client_secret=[REDACTED:password]&x=1"),
    ("password", "x-api-key: k123 and api_key=k456", "x-api-key: [REDACTED:password] and api_key=[REDACTED:password]"),
    ("password", "access_token=tok.en", "access_token=[REDACTED:password]"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----", "[REDACTED:private_key]"),
    ("private_key", 'key="-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----" x',
     'key="[REDACTED:private_key]" x'),
    # camelCase keys (Java/JS/Go loggers), in JSON and key=value form
    ("password", '{"userPassword":"hunter2","n":1}', '{"userPassword":"[REDACTED:password]","n":1}'),
    ("password", "accessToken=tok-abc123 ok", "accessToken=[REDACTED:password] ok"),
    ("password", "clientSecret: s3cr3tvalue", "clientSecret: [REDACTED:password]"),
    ("password", '"apiKey": "k-123"', '"apiKey": "[REDACTED:password]"'),
    # a JSON document inside a JSON string (escaped quotes)
    ("password", '{"body": "{\\"password\\": \\"hunter2\\", \\"n\\": 1}"}',
     '{"body": "{\\"password\\": \\"[REDACTED:password]\\", \\"n\\": 1}"}'),
    # an unterminated quote, values in brackets, a flat object, secrets:, pass=, Basic credentials
    ("password", 'login password="hunter2 and more', 'login password="[REDACTED:password]'),
    ("password", "password=<hunter2> ok", "password=[REDACTED:password]> ok"),
    ("password", "pwd=(hunter2) ok", "pwd=[REDACTED:password]) ok"),
    ("password", '{"password": {"value": "hunter2"}, "n": 1}', '{"password": [REDACTED:password], "n": 1}'),
    ("password", "secrets: s3cr3t", "secrets: [REDACTED:password]"),
    ("password", "user=bob pass=hunter2", "user=bob pass=[REDACTED:password]"),
    ("password", "Authorization: Basic dXNlcjpodW50ZXIy", "Authorization: Basic [REDACTED:password]"),
    ("private_key", "-----BEGIN PGP PRIVATE KEY BLOCK-----", "[REDACTED:private_key]"),
    ("credit_card", "paid with 4111 1111 1111 1111 today", "paid with [REDACTED:credit_card] today"),
    ("credit_card", "mc 5555555555554444 and 2223003122003222", "mc [REDACTED:credit_card] and [REDACTED:credit_card]"),
    ("credit_card", "discover 6011111111111117 jcb 3530111333300000",
     "discover [REDACTED:credit_card] jcb [REDACTED:credit_card]"),
    ("credit_card", "diners 30569309025904 up 6200000000000005", "diners [REDACTED:credit_card] up [REDACTED:credit_card]"),
    ("credit_card", "card=4111-1111-1111-1111", "card=[REDACTED:credit_card]"),
    ("credit_card", "amex 378282246310005.", "amex [REDACTED:credit_card]."),
    ("email", "mail bob@example.com now", "mail [REDACTED:email] now"),
    ("ipv4", "from 10.1.2.3:80", "from [REDACTED:ipv4]:80"),
    ("ipv6", "from 2001:db8::1 port", "from [REDACTED:ipv6] port"),
]
NOT_SECRETS = [
    "GET /api/v1/users 200 tokens=5 password",
    "card 4111 1111 1111 1112 fails luhn",
    "id 12345678901234567890123 too long",
    "AKIAIOSFODNN7EXAMPLEX too long",
    "Bearer short",
    "2026-11-18 11:06:40,007 INFO order 31386 shipped",
    "version 2.14.1 at 12:34:56",
    "bypass=1 tokens=5 passing: yes",
    # Luhn-valid numbers without a card prefix: an epoch-ms time, a trace id, a card brand's wrong length
    "ts=1764634610018 took 3ms", "trace_id=1234567890123456785", "visa-like 41111111111111113",
]


def redactor(*names, **kwargs):
    return Redactor([BUILTIN[n] for n in names or DEFAULT_PATTERNS], **kwargs)


@pytest.mark.parametrize(("rule", "line", "expected"), CASES)
def test_each_built_in_rule(rule, line, expected):
    counts = {}
    one = redactor(*({rule} | set(DEFAULT_PATTERNS)))
    assert one.text(line, counts) == expected
    assert set(counts) == {rule}
    assert sum(counts.values()) == expected.count("[REDACTED:")
    assert one.blob(line.encode() + b"\n", {}) == expected.encode() + b"\n"


@pytest.mark.parametrize("line", NOT_SECRETS)
def test_what_is_no_secret_stays(line):
    every = redactor(*(set(DEFAULT_PATTERNS) | {"email"}))
    assert every.text(line, {}) == line and every.blob(line.encode() + b"\n", {}) == line.encode() + b"\n"


def test_luhn():
    assert luhn("4111 1111 1111 1111") and luhn("378282246310005") and not luhn("4111111111111112")
    assert not luhn("1234") and not luhn("0" * 20)


def test_a_card_needs_an_issuer_prefix_and_its_length():
    """Epoch-ms times and ids pass Luhn one time in ten: without an issuer prefix they are no card."""
    assert card("4111 1111 1111 1111") and card("378282246310005") and card("5555555555554444")
    assert not card("1764634610018") and luhn("1764634610018")            # a time in ms, Luhn-valid
    assert not card("378282246310005" + "0") and not card("5555555555554444"[:15])  # brand lengths
    assert not card("3400000000000000") and not card("9999999999999995")  # wrong length for Amex; no issuer
    rules = redactor()
    times = "".join(f"ts={1764634610000 + n} took 3ms\n" for n in range(2000)).encode()
    assert rules.blob(times, {}) == times  # ~10 % of them were masked by Luhn alone


def test_json_stays_json_and_a_second_redact_leaves_masks_alone():
    line = '{"password":"a \\"quoted\\" pw","n":1}'
    once = redactor().text(line, {})
    assert orjson.loads(once) == {"password": "[REDACTED:password]", "n": 1}
    assert redactor().text(once, {}) == once


TOKENS = st.sampled_from([
    "password=", "pw", "AKIA", "IOSFODNN7EXAMPLE", "ASIA", "eyJ", JWT, "Bearer ", "abcdefghijklmnop", "4111",
    " 1111", "-1111", "1111", "4111111111111111", "-----BEGIN RSA PRIVATE KEY-----", "-----END PRIVATE KEY-----",
    "secret_key: ", SECRET_KEY, "api-key=", "token:", '"', "'", " ", "x", "é", "日", "=", ":", ",", "0", "9",
    # each trigger literal of the password rule, in other cases and separators, and the card groups
    "Passwd:", "PASSPHRASE=", "pwd=", "Api Key:", "APIKEY=", "api_key=", "Token=", "SECRET=", "bearer ",
    "378282246310005", "3782 822463 10005", "4111 1111 1111 1111", "4111-1111",
    # camelCase keys, escaped JSON, brackets, unterminated quotes, Basic credentials, card prefixes, times
    "userPassword=", "accessToken\":", "xApiKey:", '\\"password\\": \\"', '\\"', "\\", "pass=", "secrets:",
    "Authorization: Basic ", "dXNlcjpw", "<", "{", "(", "[", "}", "]", "5555555555554444", "1764634610018",
    "6011 1111 1111 1117", "-----BEGIN PGP PRIVATE KEY BLOCK-----"])
LINES = st.lists(st.lists(TOKENS, max_size=10).map("".join), max_size=25)


@settings(max_examples=300, deadline=None)
@given(LINES)
def test_the_blob_path_equals_the_rule_line_by_line(lines):
    """Candidate lines, merged runs and per-span rule subsets give what the whole regex gives on each line."""
    rules = redactor()
    blob = "".join(line + "\n" for line in lines).encode()
    by_line = b"".join(rules.combined.regex.sub(rules._replacer(rules.combined, {}, True), line.encode()) + b"\n"
                       for line in lines)
    assert rules.blob(blob, {}) == by_line
    assert by_line.decode() == "".join(rules.text(line, {}) + "\n" for line in lines)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("akptenwy0 -", min_size=1, max_size=6), min_size=1, max_size=6, unique=True),
       st.text("akptenwy0 -\n", max_size=80))
def test_the_trigger_finder_finds_every_occurrence_of_every_literal(literals, text):
    """Literals grouped by their rarest byte into one scan each (or bytes.find) report exactly what a
    search for each literal alone reports, also when one literal is inside another."""
    literals = [literal.encode() for literal in literals]
    finder = ReFinder({literal: 1 << index for index, literal in enumerate(literals)}, VIEW_FREQUENCY)
    data = text.encode()
    expected = sorted((at, 1 << index) for index, literal in enumerate(literals)
                      for at in range(len(data)) if data.startswith(literal, at))
    assert sorted(finder.hits(data, 10**6)) == expected
    assert finder.hits(data, len(expected) - 1) is None if expected else finder.hits(data, 0) == []


def test_both_engines_are_available_here():
    """The test environment installs hyperscan (a runtime dependency): the next tests compare the two."""
    assert ENGINES == ("hyperscan", "re")


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=5), max_size=4, unique=True),
       st.lists(st.text("akptenwy0 -_A", min_size=1, max_size=5), max_size=4, unique=True),
       st.lists(st.sampled_from([b"a", b"K", b"p", b"T", b"0", b"7", b" ", b"-", b"_", b"\n", b"\x00", b"\xff", b"y"]),
                max_size=60))
def test_each_engine_finds_raw_literals_in_the_text_and_view_literals_in_its_view(engine, raw, view, pieces):
    """Against the definition: a raw literal where the text holds it, a view literal where the view
    (letters lower-cased, digits 0, " -_" as " ") holds it; a view literal no view can hold ("A",
    "_") is never found."""
    raw_masks = {literal: 1 << index for index, literal in enumerate(raw)}
    view_masks = {literal.encode(): 1 << (8 + index) for index, literal in enumerate(view)}
    data = b"".join(pieces)
    seen = data.translate(VIEW_TABLE)
    expected = sorted([(at, mask) for literal, mask in raw_masks.items() for at in range(len(data))
                       if data.startswith(literal, at)]
                      + [(at, mask) for literal, mask in view_masks.items() for at in range(len(data))
                         if seen.startswith(literal, at)])
    finder = trigger_finder(raw_masks, view_masks, engine)
    assert sorted(finder.hits(data, 10**6)) == expected
    if expected:
        assert finder.hits(data, len(expected) - 1) is None  # over the limit: the caller subs everything


def test_the_hyperscan_engine_scans_from_several_threads_at_once():
    """A scan releases the GIL, and a hyperscan scratch space serves one scan at a time: each thread has
    its own, so inputs redacting at the same moment neither fail nor mix their hits."""
    finder = trigger_finder({b"AKIA": 1}, {b"token": 2}, "hyperscan")
    texts = [(b"x" * 50_000 + b" token=1 " * (i + 1) + b"AKIA" * i) for i in range(8)]
    results, errors = {}, []

    def scan(i):
        try:
            for _ in range(20):
                results[i] = sorted(finder.hits(texts[i], 10**6))
        except Exception as error:  # pragma: no cover - what the test would report
            errors.append(error)

    threads = [threading.Thread(target=scan, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(8):
        assert [mask for _, mask in results[i]].count(2) == i + 1 and [m for _, m in results[i]].count(1) == i


def test_without_hyperscan_redact_uses_the_re_engine():
    """An architecture without a hyperscan wheel: the import fails, the re engine finds the triggers."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['hyperscan'] = None\n"
            "from shipper.filters.literals import ENGINES\n"
            "from shipper.filters.redact import BUILTIN, DEFAULT_PATTERNS, Redactor\n"
            "r = Redactor([BUILTIN[n] for n in DEFAULT_PATTERNS])\n"
            "print(ENGINES, type(r.finder).__name__, r.blob(b'ok\\npassword=hunter2\\n', {}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('re',) ReFinderPair b'ok\\npassword=[REDACTED:password]\\n'"


@settings(max_examples=200, deadline=None)
@given(LINES)
def test_the_engines_redact_the_same(lines):
    """The whole blob path, hyperscan against re: the same bytes and the same counts."""
    blob = "".join(line + "\n" for line in lines).encode()
    results = []
    for engine in ENGINES:
        counts: dict[str, int] = {}
        results.append((Redactor([BUILTIN[name] for name in BUILTIN], engine=engine).blob(blob, counts), counts))
    assert results[0] == results[-1]


def test_allow_list_and_hash_mode():
    allowed = redactor(allow=["AKIAIOSFODNN7EXAMPLE", "4111 1111 1111 1111"])
    line = "AKIAIOSFODNN7EXAMPLE AKIAI44QH7DHBEXAMPLE 4111 1111 1111 1111"
    assert allowed.text(line, {}) == "AKIAIOSFODNN7EXAMPLE [REDACTED:aws_access_key_id] 4111 1111 1111 1111"
    hashed = redactor(mode="hash", key=b"k1")
    digest = hmac.new(b"k1", b"hunter2", hashlib.sha256).hexdigest()[:16]
    assert hashed.text("password=hunter2 pwd=hunter2", {}) == f"password=[HMAC:password:{digest}] pwd=[HMAC:password:{digest}]"
    assert redactor(mode="hash", key=b"k2").text("password=hunter2", {}) != f"password=[HMAC:password:{digest}]"


def test_a_huge_line_is_redacted_to_its_end():
    line = "x" * (1 << 20) + " password=hunter2\n"
    assert redactor().blob(line.encode(), {}).endswith(b" password=[REDACTED:password]\n")


# ---------------------------------------------------------------- the filter

def make(extra: str = "", environ=None):
    settings_ = one_filter_config("redact", extra, environ).filters[0]
    stats = Stats()
    return RedactFilter(settings_, FilterContext("redact.0", stats, Envelope(), threading.Event())), stats


def test_blob_fields_and_messages_are_redacted_and_counted_per_rule():
    redact, stats = make()
    blob = Batch("app", "/x", 0.0, blob=b"ok\npassword=a AKIAIOSFODNN7EXAMPLE\n")
    [out] = redact.apply(blob)
    assert out.blob == b"ok\npassword=[REDACTED:password] [REDACTED:aws_access_key_id]\n"
    assert stats.get("redactions", filter="redact.0", rule="password") == 1
    assert stats.get("redactions", rule="aws_access_key_id") == 1
    shared = {PARSED: {"auth": {"token": "x", "header": f"Bearer {'a' * 20}"}, "n": 3}}
    batch = Batch("app", None, 0.0, messages=["pwd=1", "fine"], fields=[shared, shared])
    [out] = redact.apply(batch)
    record = list(out.records(Envelope()))[0]
    assert record["message"] == "pwd=[REDACTED:password]"
    # a field named like a secret ("token") is one whole; others are searched like text
    assert record["auth"] == {"token": "[REDACTED:password]", "header": "Bearer [REDACTED:bearer]"} and record["n"] == 3
    assert shared[PARSED]["auth"]["header"] == f"Bearer {'a' * 20}"  # copied, not changed in place


def test_a_private_key_block_is_redacted_line_by_line_across_batches():
    redact, _ = make()
    first = b"start\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx\n"
    second = b"Zm9vYmFyYmF6\n-----END RSA PRIVATE KEY-----\nafter\nMIIEnotakey\n"
    [one] = redact.apply(Batch("app", "/k.log", 0.0, blob=first))
    [two] = redact.apply(Batch("app", "/k.log", 0.0, blob=second))
    assert one.blob == b"start\n[REDACTED:private_key]\n[REDACTED:private_key]\n"
    assert two.blob == b"[REDACTED:private_key]\n[REDACTED:private_key]\nafter\nMIIEnotakey\n"
    [other] = redact.apply(Batch("app", "/k.log", 0.0, blob=b"-----BEGIN PRIVATE KEY-----\nnot base64 here\n"))
    assert other.blob == b"[REDACTED:private_key]\nnot base64 here\n"  # a non-PEM line ends the block
    message = "x\n-----BEGIN PRIVATE KEY-----\nMIIE\nAAAA\n-----END PRIVATE KEY-----\ny"
    [event] = redact.apply(Batch("app", None, 0.0, messages=[message]))
    assert event.messages == ["x\n[REDACTED:private_key]\ny"]


def test_a_failure_drops_the_batch_and_counts_it(monkeypatch):
    redact, stats = make()

    def broken(blob, counts):
        raise RuntimeError("bug")

    monkeypatch.setattr(redact.redactor, "blob", broken)
    [out] = redact.apply(Batch("app", "/x", 0.0, blob=b"password=a\nb\n"))
    assert out.count == 0 and out.blob is None and out.messages == []
    assert stats.get("records_dropped", reason="filter_error", filter="redact.0") == 2


def test_user_rules_value_group_contains_and_line_by_line():
    redact, stats = make("""patterns = []
custom = [{ name = "order", pattern = 'ord_(?P<value>[a-z0-9]+)', contains = ["ord_"] },
          { name = "spread", pattern = 'a\\s+b' }]""")
    [out] = redact.apply(Batch("app", "/x", 0.0, blob=b"ord_abc12 x\na\nb a  b\n"))
    assert out.blob == b"ord_[REDACTED:order] x\na\nb [REDACTED:spread]\n"  # "a\nb" is two records: no match
    assert stats.get("redactions", rule="order") == 1


@pytest.mark.parametrize(("extra", "message"), [
    ("custom = [{ name = \"x\", pattern = '(' }]", "filters[0].custom[0].pattern: invalid regular expression"),
    ("custom = [{ name = \"x\", pattern = '(a)\\1' }]", "filters[0].custom[0].pattern: numbered back-references"),
    ("custom = [{ name = \"x\", pattern = 'a*' }]", "filters[0].custom[0].pattern: matches the empty string"),
    ("custom = [{ name = \"jwt\", pattern = 'a' }]", "filters[0].custom[0].name: 'jwt' is a built-in"),
    ("custom = [{ name = \"x\", pattern = 'a', other = 1 }]", "filters[0].custom[0].other: unknown key"),
    ('patterns = ["jwt", "nope"]', "filters[0].patterns: unknown pattern 'nope'"),
    ('allow = ["("]', "filters[0].allow[0]: invalid regular expression"),
    ('mode = "hash"', "filters[0].hash_key_env: required with mode = \"hash\""),
    ('mode = "hash"\nhash_key_env = "SHIPPER_TEST_REDACT_KEY"', "filters[0].hash_key_env: the environment variable "
                                                               "SHIPPER_TEST_REDACT_KEY is not set"),
])
def test_config_errors_name_the_key(extra, message):
    with pytest.raises(ConfigError) as caught:
        make(extra)
    assert any(problem.startswith(message) for problem in caught.value.problems), caught.value.problems


def test_hash_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHIPPER_TEST_REDACT_KEY", "k1")
    redact, _ = make('mode = "hash"\nhash_key_env = "SHIPPER_TEST_REDACT_KEY"')
    [out] = redact.apply(Batch("app", None, 0.0, messages=["password=hunter2"]))
    assert out.messages == [f"password=[HMAC:password:{hmac.new(b'k1', b'hunter2', hashlib.sha256).hexdigest()[:16]}]"]


def test_patterns_all_and_default():
    assert [r.name for r in rules_of(make('patterns = ["all"]')[0].settings)] == list(BUILTIN)
    assert [r.name for r in rules_of(make()[0].settings)] == list(DEFAULT_PATTERNS)


# ---------------------------------------------------------------- review findings (issue 16)

def test_parsed_fields_camel_case_names_non_strings_keys_and_depth():
    redact, stats = make()
    deep: dict = {"password": "deep-hunter2", "note": "password=deepsecret"}
    for _ in range(40):
        deep = {"a": deep}
    parsed = {"userPassword": "hunter2", "accessToken": "tok-abc123", "clientSecret": "s3cr3tvalue", "apiKey": "k1",
              "password": 12345678, "dbPassword": {"value": "hunter2"}, "tokens_list": 3, "token": ["a1", "b2"],
              "card": 4111111111111111, "ts": 1764634610018, "AKIAIOSFODNN7EXAMPLE": "x", "ctx": deep,
              "pass": None, "secret": True, "bypass": "keep", "password_set": "yes"}
    [out] = redact.apply(Batch("app", None, 0.0, messages=["m"], fields=[{PARSED: parsed}]))
    got = out.fields[0][PARSED]
    mask = "[REDACTED:password]"
    assert [got[k] for k in ("userPassword", "accessToken", "clientSecret", "apiKey", "password", "dbPassword",
                             "token")] == [mask] * 7
    assert got["card"] == "[REDACTED:credit_card]" and got["ts"] == 1764634610018 and got["tokens_list"] == 3
    assert "AKIAIOSFODNN7EXAMPLE" not in got and got["[REDACTED:aws_access_key_id]"] == "x"
    assert got["pass"] is None and got["secret"] is True and got["bypass"] == "keep" and got["password_set"] == "yes"
    assert b"hunter2" not in orjson.dumps(got) and b"deepsecret" not in orjson.dumps(got)
    assert stats.get("redactions", rule="too_deep") == 1
    assert parsed["password"] == 12345678  # copied, not changed in place


def test_hash_mode_masks_a_non_string_value_by_its_text():
    hashed = Redactor([BUILTIN["password"]], mode="hash", key=b"k1")
    digest = hmac.new(b"k1", b"12345678", hashlib.sha256).hexdigest()[:16]
    assert hashed.field("password", 12345678, {}) == f"[HMAC:password:{digest}]"


PEM = ["-----BEGIN RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEAuSECRETBODYLINE1xyz", "QWERTYSECRETBODYLINE2abc==",
       "-----END RSA PRIVATE KEY-----", "next line"]
MASKED = ["[REDACTED:private_key]"] * 4 + ["next line"]


def test_a_private_key_in_a_general_batch_and_across_batch_forms():
    """Messages (a read with an invalid byte, a parser, one-line multiline events) keep the block's
    state like blobs do, per file; a block closed in a general batch leaves no state behind."""
    redact, _ = make()
    [out] = redact.apply(Batch("app", "/k.log", 0.0, messages=list(PEM)))
    assert out.messages == MASKED
    [one] = redact.apply(Batch("app", "/k.log", 0.0, blob="".join(f"{line}\n" for line in PEM[:2]).encode()))
    [two] = redact.apply(Batch("app", "/k.log", 0.0, messages=PEM[2:]))
    [three] = redact.apply(Batch("app", "/k.log", 0.0, blob=b"ok\ndone\n"))
    assert one.message_list() + two.messages == MASKED and three.blob == b"ok\ndone\n"
    # general then blob; another file and another inode (a rotated file) do not continue the block
    redact.apply(Batch("app", "/k.log", 0.0, messages=PEM[:1]))
    [other] = redact.apply(Batch("app", "/other.log", 0.0, messages=["QWERTYSECRET"]))
    [rest] = redact.apply(Batch("app", "/k.log", 0.0, blob=b"QWERTYSECRET\n-----END RSA PRIVATE KEY-----\nok\n"))
    assert other.messages == ["QWERTYSECRET"] and rest.blob == b"[REDACTED:private_key]\n" * 2 + b"ok\n"
    redact.apply(Batch("app", "/k.log", 0.0, messages=PEM[:1]))
    rotated = Batch("app", "/k.log", 0.0, messages=["QWERTYSECRET"])
    rotated.origin = (1, 2)
    assert redact.apply(rotated)[0].messages == ["QWERTYSECRET"]
    # PGP armor: headers and a blank line inside the block
    pgp = ["-----BEGIN PGP PRIVATE KEY BLOCK-----", "Version: GnuPG v2", "", "lQOYBGXsecretbody", "=a1b2",
           "-----END PGP PRIVATE KEY BLOCK-----", "done."]
    [out] = redact.apply(Batch("app", "/p.log", 0.0, blob="".join(f"{line}\n" for line in pgp).encode()))
    assert out.blob == b"[REDACTED:private_key]\n" * 6 + b"done.\n"
    [out] = redact.apply(Batch("app", "/p.log", 0.0, messages=list(pgp)))
    assert out.messages == ["[REDACTED:private_key]"] * 6 + ["done."]


PEM_TOKENS = st.sampled_from(PEM[:4] + ["-----BEGIN PGP PRIVATE KEY BLOCK-----", "-----END PGP PRIVATE KEY BLOCK-----",
                                        "ok", "a b", "x=1", "", "Zm9v==", "Version: 1", "password=x"])


@settings(max_examples=200, deadline=None)
@given(st.lists(PEM_TOKENS, max_size=20), st.lists(st.integers(0, 20), max_size=4), st.lists(st.booleans(), min_size=5))
def test_private_key_blocks_are_the_same_in_blobs_and_in_messages(lines, cuts, forms):
    """The same lines cut into batches at random places, each batch a blob or messages: the records
    shipped are the same as one blob of all of them gives."""
    [whole] = make()[0].apply(Batch("app", "/k.log", 0.0, blob="".join(f"{line}\n" for line in lines).encode()))
    expected = whole.message_list() if lines else []
    redact, _ = make()
    got, last = [], 0
    for index, cut in enumerate(sorted(set(cuts)) + [len(lines)]):
        part = lines[last:cut]
        last = max(last, cut)
        if not part:
            continue
        if forms[index % len(forms)]:
            batch = Batch("app", "/k.log", 0.0, blob="".join(f"{line}\n" for line in part).encode())
        else:
            batch = Batch("app", "/k.log", 0.0, messages=list(part))
        got += redact.apply(batch)[0].message_list()
    assert got == expected


USER_RULES = """patterns = []
custom = [{ name = "pin", pattern = '\\Apin (?P<value>[0-9]+)', contains = ["pin"] },
          { name = "tail", pattern = 'code=(?P<value>[0-9]+)\\Z' },
          { name = "tok", pattern = 'tok\\s*(?P<value>\\w+)', contains = ["tok"] },
          { name = "after", pattern = '(?<=user )(?P<value>[a-z]+)' },
          { name = "word", pattern = '(?i)secretword' }]"""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["pin ", "1234", "code=", "99", "tok", " ", "abc", "user ", "bob",
                                          "SecretWord", "x"]), max_size=6).map("".join), max_size=12))
def test_user_rules_with_anchors_lookarounds_and_newlines_apply_per_line_in_blobs(lines):
    """\\A, \\Z and look-behinds mean the line's start and end in a blob too, and a match across a
    newline (tok\\s*) never masks the wrong word: the blob equals the messages line by line."""
    redact, _ = make(USER_RULES)
    [blob] = redact.apply(Batch("app", "/x", 0.0, blob="".join(f"{line}\n" for line in lines).encode()))
    [messages] = redact.apply(Batch("app", None, 0.0, messages=list(lines)))
    assert blob.message_list() == messages.messages


def test_user_rules_per_line_examples_and_scoped_flags():
    redact, _ = make(USER_RULES)
    lines = ["pin 1234", "pin 5678", "x code=111", "tok", "tok abc123", "akiaiosfodnn7example SECRETWORD"]
    [out] = redact.apply(Batch("app", "/x", 0.0, blob="".join(f"{line}\n" for line in lines).encode()))
    assert out.message_list() == ["pin [REDACTED:pin]", "pin [REDACTED:pin]", "x code=[REDACTED:tail]", "tok",
                                  "tok [REDACTED:tok]", "akiaiosfodnn7example [REDACTED:word]"]
    # (?i) of one rule stays its own: the access key rule is still case-sensitive
    redact, _ = make("custom = [{ name = \"word\", pattern = '(?i)secretword' }]")
    assert redact.apply(Batch("app", None, 0.0, messages=["akiaiosfodnn7example SecretWord"]))[0].messages == \
        ["akiaiosfodnn7example [REDACTED:word]"]


def test_allow_regexes_with_their_own_flags_and_their_errors():
    redact, _ = make('allow = ["(?i)akiaiosfodnn7example", "4111 1111 1111 1111"]')
    [out] = redact.apply(Batch("app", None, 0.0, messages=["AKIAIOSFODNN7EXAMPLE AKIAI44QH7DHBEXAMPLE"]))
    assert out.messages == ["AKIAIOSFODNN7EXAMPLE [REDACTED:aws_access_key_id]"]
    with pytest.raises(ConfigError) as caught:
        make('allow = ["ok", "a(?i)b"]')
    assert any(p.startswith("filters[0].allow[1]: invalid regular expression 'a(?i)b'") for p in caught.value.problems)
    assert not any(".custom" in p for p in caught.value.problems)


def test_a_blob_whose_fields_changed_drops_its_cached_ndjson():
    redact, _ = make()
    batch = Batch("app", "/x", 0.0, blob=b"ok\n", fields=[{PARSED: {"password": "hunter2"}}])
    batch._ndjson = b"stale"
    [out] = redact.apply(batch)
    assert out._ndjson is None and out.fields[0][PARSED]["password"] == "[REDACTED:password]"
