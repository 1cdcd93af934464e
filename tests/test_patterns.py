"""Error patterns (issue 17, item 2): Drain-style template mining in shipper.postmortem.patterns.

A log generated from known templates (numbers, addresses, UUIDs, hex ids and words as the variable
parts) is mined, and the mined templates must be those templates, with exact counts, first and
last times, the first record as the example and the most severe level. Then: the memory bound
(clusters capped, what was dropped counted), anchors that stay put while templates generalise,
the recent window (``top(since=...)``), and the configuration errors.
"""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.postmortem.patterns import MAX_EXAMPLE, PatternMiner, key_line, mask, mine

USERS = ["alice", "bob", "carol", "dave", "erin"]
TABLES = ["orders", "users", "payments"]

# (what the template makes, the template mining must find, the level)
TEMPLATES = [
    (lambda r: f"connection to {r.randrange(1, 255)}.{r.randrange(256)}.0.{r.randrange(256)}:{r.randrange(1024, 65535)} "
               f"refused after {r.randrange(1, 5000)} ms",
     "connection to <IP> refused after <NUM> ms", "error"),
    (lambda r: f"user {r.choice(USERS)} failed to log in from {r.randrange(1, 255)}.0.0.{r.randrange(256)}",
     "user <*> failed to log in from <IP>", "warn"),
    (lambda r: f"request {uuid.UUID(int=r.getrandbits(128))} timed out after {r.random() * 30:.3f} s",
     "request <UUID> timed out after <NUM> s", "error"),
    (lambda r: f"query on table {r.choice(TABLES)} took {r.randrange(1000, 9000)} ms (slow)",
     "query on table <*> took <NUM> ms (slow)", "warn"),
    (lambda r: f"segfault at {r.getrandbits(48):#x} ip {r.getrandbits(44) | 0xa << 44:012x} in libc.so.6",
     "segfault at <HEX> ip <HEX> in libc.so.<NUM>", "critical"),
    (lambda r: "Traceback (most recent call last):\n  File \"/app/worker.py\", line "
               f"{r.randrange(10, 400)}, in run\n    data = load()\nMemoryError",
     "Traceback ... MemoryError", "error"),
    (lambda r: f"disk /dev/nvme{r.randrange(4)}n1 is {r.randrange(90, 100)}% full",
     "disk /dev/nvme<NUM>n<NUM> is <NUM>% full", "warn"),
    (lambda r: "out of memory: killed the worker", "out of memory: killed the worker", "fatal"),
]
T0 = 1_795_946_400.0  # 2026-11-29T10:00:00Z


def generated(count: int, seed: int = 7, start: float = T0, step: float = 0.5):
    """(record, message, level, time, expected template) for ``count`` lines of the templates, in a random mix."""
    rand = random.Random(seed)
    out = []
    for index in range(count):
        make, template, level = TEMPLATES[rand.randrange(len(TEMPLATES))]
        if template.startswith("user") and rand.random() < 0.1:
            level = "error"   # the same pattern at two levels: the most severe is its level
        message = make(rand)
        moment = start + index * step
        out.append(({"time": moment, "tag": "app", "message": message, "seq": index}, message, level, moment, template))
    return out


def test_the_mined_templates_are_the_templates_the_log_was_made_of():
    lines = generated(5000)
    miner = PatternMiner()
    anchors = [miner.add(record, message, level, moment) for record, message, level, moment, _ in lines]
    patterns = miner.top(100)
    assert sorted(p.template for p in patterns) == sorted(t for _, t, _ in TEMPLATES)
    assert len(miner) == len(TEMPLATES) and miner.records == 5000 and miner.dropped == 0
    for pattern in patterns:
        mine_ = [line for line in lines if line[4] == pattern.template]
        assert pattern.count == len(mine_)
        assert (pattern.first, pattern.last) == (mine_[0][3], mine_[-1][3])
        assert pattern.example is mine_[0][0] or pattern.example == mine_[0][0]  # the first seen, whole
        levels = {line[2] for line in mine_}
        assert pattern.level == max(levels, key=["warn", "error", "critical", "fatal"].index)
        # every line of the template got the pattern's anchor
        assert {anchors[line[0]["seq"]] for line in mine_} == {pattern.anchor}
    assert [p.count for p in patterns] == sorted((p.count for p in patterns), reverse=True)
    assert miner.top(3) == patterns[:3]


def test_the_same_log_in_another_order_gives_the_same_templates_and_counts():
    lines = generated(3000, seed=11)
    forward = mine(line[:4] for line in lines)
    shuffled = lines[:]
    random.Random(3).shuffle(shuffled)
    backward = mine(line[:4] for line in shuffled)
    assert {(p.template, p.count, p.first, p.last) for p in forward.top(50)} == \
        {(p.template, p.count, p.first, p.last) for p in backward.top(50)}


def test_anchors_stay_put_while_a_template_generalises_and_are_never_reused():
    miner = PatternMiner()
    first = miner.add({}, "worker alpha stopped cleanly", "warn", T0)
    assert miner.top()[0].template == "worker alpha stopped cleanly"
    assert miner.add({}, "worker beta stopped cleanly", "warn", T0 + 1) == first
    assert miner.top()[0].template == "worker <*> stopped cleanly" and miner.top()[0].anchor == first
    other = miner.add({}, "cache flushed", "warn", T0 + 2)
    assert other != first and miner.add({}, "worker gamma stopped cleanly", "warn", T0 + 3) == first
    # shed clusters: their anchors are gone from top() and new clusters get new ones
    small = PatternMiner(max_clusters=4)
    rand = random.Random(1)
    words = ["".join(rand.choice("abcdefghij") for _ in range(8)) for _ in range(120)]
    made = [small.add({}, " ".join(words[3 * i:3 * i + 3]), "warn", T0 + i) for i in range(40)]
    assert len(set(made)) == 40 and len(small) <= 4
    assert {p.anchor for p in small.top(10)} <= set(made[-4:] + made[:1])


def test_clusters_are_bounded_and_what_was_dropped_is_counted():
    miner = PatternMiner(max_clusters=50)
    rand = random.Random(5)
    frequent = 0
    for index in range(20_000):
        if index % 4 == 0:
            miner.add({}, f"db timeout after {rand.randrange(100)} ms", "error", T0 + index)
            frequent += 1
        else:  # a flood of one-off messages: every one its own cluster
            word = "".join(rand.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))
            miner.add({}, f"{word} {word[::-1]} {word[:6]}", "warn", T0 + index)
        assert len(miner) <= 50
    top = miner.top(1)[0]
    assert (top.template, top.count) == ("db timeout after <NUM> ms", frequent)  # the frequent one survives, exact
    assert sum(p.count for p in miner.top(1000)) + miner.dropped == miner.records == 20_000
    assert len(miner.cache) <= 8192


def test_the_recent_window_counts_only_the_records_at_or_after_since():
    lines = generated(2000, seed=3, step=1.0)   # 2,000 s, one line a second
    miner = mine(line[:4] for line in lines)
    end = lines[-1][3]
    recent = miner.top(20, since=end - 300)
    expected: dict[str, list] = {}
    for record, _, _, moment, template in lines:
        if moment >= end - 300:
            expected.setdefault(template, []).append(record)
    assert {p.template: p.count for p in recent} == {t: len(r) for t, r in expected.items()}
    for pattern in recent:
        assert pattern.first == expected[pattern.template][0]["time"]
        assert pattern.last == expected[pattern.template][-1]["time"]
        assert pattern.example == expected[pattern.template][-1]   # the latest record, inside the window
    assert miner.top(20, since=T0 - 1) == miner.top(20)   # before every record: the whole range
    assert miner.top(20, since=end + 1) == []
    with pytest.raises(ValueError, match="last 600 s"):
        miner.top(20, since=T0 + 100)   # counts per second are not kept that far back


def test_a_pattern_seen_only_long_before_the_window_is_not_in_it():
    miner = PatternMiner()
    miner.add({}, "started late", "warn", T0 + 5000)
    miner.add({}, "early trouble 1", "error", T0)
    miner.add({}, "late trouble 7", "error", T0 + 5000)
    recent = miner.top(since=T0 + 4900)
    assert [(p.template, p.count, p.anchor) for p in recent] == [("started late", 1, "p1"),
                                                                 ("late trouble <NUM>", 1, "p3")]
    assert [p.template for p in miner.top()] == ["early trouble <NUM>", "started late", "late trouble <NUM>"]


def test_masks_and_the_key_line():
    assert mask("GET /api/v2/items/1234?x=5 from 10.1.2.3:443 took 12.5ms") == \
        "GET /api/v<NUM>/items/<NUM>?x=<NUM> from <IP> took <NUM>ms"
    assert mask("id 3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b deadbeef01 0xFF00") == "id <UUID> <HEX> <HEX>"
    assert mask("no digits here") == "no digits here"
    for stamp in ("2026-11-29T13:02:00.123Z", "2026-11-29 13:02:00,123", "2026/11/29 13:02:00", "13:02:00",
                  "2026-11-29T13:02:00+01:00", "13:02:00.123456"):
        assert mask(f"{stamp} ERROR x") == "<TIME> ERROR x", stamp
    assert mask("Mar  1 12:00:00 web1 kernel: oom") == "Mar  <NUM> <TIME> web<NUM> kernel: oom"
    assert mask("deadbeef cafebabe1 0000beef 12345678 abcdefgh1") == "deadbeef <HEX> <HEX> <NUM> abcdefgh<NUM>"
    assert mask("took 12:30 min") == "took <NUM>:<NUM> min"   # not a time of day with seconds
    assert mask("user42 ipv6 libc.so.6") == "user<NUM> ipv<NUM> libc.so.<NUM>"   # a number inside a word too
    assert mask("a1b2c3d4-0000-4000-8000-00000000abcd x") == "<UUID> x"
    assert mask("héllo 42 wörld") == "héllo <NUM> wörld"
    assert mask("1.2.3.4.5 is not an address") == "<NUM> is not an address"
    assert key_line("Traceback (most recent call last):\n  File \"x\", line 1\nKeyError: 'user'\n") == \
        "Traceback ... KeyError: 'user'"
    assert key_line("first line\nsecond") == "first line"
    assert key_line("Traceback (most recent call last):") == "Traceback (most recent call last):"
    assert len(key_line("x" * 5000)) == 1000


def test_long_and_odd_messages_are_bounded():
    miner = PatternMiner()
    huge = "E " + "word " * 100_000
    miner.add({"message": huge}, huge, "error", T0)
    pattern = miner.top()[0]
    assert len(pattern.template.split()) <= 64
    assert len(pattern.example["message"]) < MAX_EXAMPLE + 100 and "more characters" in pattern.example["message"]
    miner.add({"message": ""}, "", "error", T0)
    miner.add({"message": "   "}, "   ", None, T0)
    assert {p.template for p in miner.top()} >= {""}
    assert miner.records == 3


def test_configuration_errors_name_the_option():
    with pytest.raises(ValueError, match="depth 2"):
        PatternMiner(depth=2)
    with pytest.raises(ValueError, match="similarity 0"):
        PatternMiner(similarity=0)
    with pytest.raises(ValueError, match="max_clusters 1"):
        PatternMiner(max_clusters=1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=80), st.sampled_from(["warn", "error", None]),
                          st.floats(min_value=0, max_value=1e6)), max_size=60))
def test_whatever_the_messages_the_counts_add_up_and_the_bounds_hold(items):
    miner = PatternMiner(max_clusters=8)
    anchors = [miner.add({"message": m}, m, level, t) for m, level, t in items]
    patterns = miner.top(100)
    assert len(miner) <= 8 and len(patterns) == len(miner)
    assert sum(p.count for p in patterns) + miner.dropped == len(items)
    assert {p.anchor for p in patterns} <= set(anchors)
    for pattern in patterns:
        assert pattern.first <= pattern.last
