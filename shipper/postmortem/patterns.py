"""Error patterns: similar messages grouped into templates, in the style of the Drain algorithm
(He et al., "Drain: An Online Log Parsing Approach with Fixed Depth Tree", ICWS 2017).

A message's key line (its first line; for a Python traceback, its last line, the exception) is cut
to MAX_LINE characters, its variable parts masked (<TIME>, <UUID>, <IP>, <HEX>, <NUM>) and split into
tokens. A fixed-depth tree routes it by token count, then by its first ``depth - 3`` tokens (depth
counts the root, the token-count and the leaf levels too, as in the paper and drain3; a token
holding a digit or a mask goes to the ``<*>`` branch, as does any token past MAX_CHILDREN branches
of a node), to a leaf holding a few clusters. The most similar cluster there (the share of
positions where the template holds the same word, masks and ``<*>`` not counted) takes the
message when its similarity reaches ``similarity``; the template's differing positions become
``<*>``. Else the message starts a new cluster.

Bounded whatever the input: at most ``max_clusters`` clusters (when full, the half with the
fewest records is dropped and its records counted in ``dropped``), one example record per
cluster (its message cut at MAX_EXAMPLE characters), counts per second only for the last
``recent`` seconds (what ``top(since=...)`` needs for "the last 5 minutes before the end"), and a
bounded cache of masked lines already placed (a repeated line costs a dict lookup, not a tree walk).

Anchors ("p1", "p2", ...) are given in the order clusters are made and never change or get reused:
a line can link to its pattern as soon as it is added.

The cost is Python work per message (~µs, see /tmp/notes/R-A.md and the README): mine the errors and
warnings, not every record.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from shipper.filters import level_rank

MAX_LINE = 1000       # characters of the key line mined (the cost and the tokens of one message are bounded)
MAX_TOKENS = 64       # tokens of the key line compared; the rest are one "<...>" token
MAX_CHILDREN = 100    # branches of a tree node before further tokens share the <*> branch
MAX_EXAMPLE = 16_384  # characters of an example's message kept
CACHE = 8192          # masked lines remembered with their cluster
WILDCARD = "<*>"
MASK_TOKENS = frozenset(("<*>", "<TIME>", "<UUID>", "<IP>", "<HEX>", "<NUM>", "<...>"))
_NEVER = "\x00"  # no token of a split line is this

# The masks, in this order (a time, a UUID and an address hold numbers). Each is one
# re.sub with a constant replacement: C speed, no Python call per match.
_MASKS = (
    # a date and time of day, or a time of day, as one token: a line's own timestamp says nothing of it
    (re.compile(r"(?<![0-9])(?:\d{4}[-/]\d\d[-/]\d\d(?:[T ]|(?![0-9])))?\d\d:\d\d:\d\d(?:[.,]\d+)?"
                r"(?:Z|[+-]\d\d:?\d\d(?![0-9]))?(?![0-9])"), "<TIME>"),
    (re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
                r"(?![0-9A-Fa-f])"), "<UUID>"),
    (re.compile(r"(?<![0-9.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?::\d{1,5})?"
                r"(?![0-9.])"), "<IP>"),
    (re.compile(r"(?<![0-9A-Za-z_])(?:0[xX][0-9A-Fa-f]+|(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}"
                r"|(?=[0-9A-F]*[A-F])(?=[0-9A-F]*\d)[0-9A-F]{8,})(?![0-9A-Za-z_])"), "<HEX>"),
    (re.compile(r"(?<![A-Za-z0-9_.])[-+]?\d+(?:[.,]\d+)*"), "<NUM>")  # not libc.so.6, v2,
)
_DIGIT = re.compile(r"\d")
_TRACEBACK = "Traceback (most recent call last)"


def key_line(message: str) -> str:
    """The line of ``message`` that names it: the first line, or for a Python traceback (which
    always starts alike) "Traceback ... " and its last line, the exception."""
    first, newline, rest = message.partition("\n")
    if first.startswith(_TRACEBACK) and newline:
        last = rest.rstrip().rpartition("\n")[2].strip()
        first = f"Traceback ... {last}" if last else first
    return first[:MAX_LINE]


def mask(line: str) -> str:
    """``line`` with its variable parts replaced by <TIME>, <UUID>, <IP>, <HEX>, <NUM>."""
    if _DIGIT.search(line) is None:  # every mask holds a digit: most words-only lines end here
        return line
    for regex, replacement in _MASKS:
        line = regex.sub(replacement, line)
    return line


def _variable(token: str) -> bool:
    """A token that routes to the <*> branch: it holds a digit or a mask."""
    return "<" in token or _DIGIT.search(token) is not None


@dataclass
class Pattern:
    template: str        # e.g. "connection to <IP> refused after <NUM> ms"
    count: int
    first: float         # epoch seconds
    last: float
    example: dict        # one full record (the first seen) as fetch yields it
    level: str | None    # the most severe level among its records
    anchor: str          # stable id for in-page links, e.g. "p3"


class _Cluster:
    __slots__ = ("tokens", "fixed", "count", "first", "last", "example", "latest", "level", "rank", "anchor", "leaf",
                 "seconds", "order")

    def __init__(self, tokens: list[str], anchor: str, leaf: list, order: int):
        self.set_tokens(tokens)
        self.count = 0
        self.first = float("inf")
        self.last = float("-inf")
        self.example: dict | None = None
        self.latest: dict | None = None       # the record of the latest time (the example of a recent window)
        self.level: str | None = None
        self.rank = -1
        self.anchor = anchor
        self.leaf = leaf
        self.seconds: dict[int, list] = {}   # second -> [count, earliest time], for the last ``recent`` seconds
        self.order = order


    def set_tokens(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.fixed = [_NEVER if token in MASK_TOKENS else token for token in tokens]


def _kept(record: dict) -> dict:
    """The record as an example: a message past MAX_EXAMPLE characters is cut (said), the rest kept."""
    message = record.get("message")
    if isinstance(message, str) and len(message) > MAX_EXAMPLE:
        record = dict(record)
        record["message"] = message[:MAX_EXAMPLE] + f"\u2026 ({len(message) - MAX_EXAMPLE:,} more characters)"
    return record


class PatternMiner:
    """Drain-style template mining, bounded memory (cap on clusters)."""

    def __init__(self, depth: int = 4, similarity: float = 0.5, max_clusters: int = 1000, *,
                 recent: float = 600.0):
        if not 3 <= depth <= 16:
            raise ValueError(f"depth {depth}: 3 (the root, the token count, the leaf) to 16")
        if not 0.0 < similarity <= 1.0:
            raise ValueError(f"similarity {similarity}: between 0 (excluded) and 1")
        if max_clusters < 2:
            raise ValueError(f"max_clusters {max_clusters}: at least 2")
        self.prefix = depth - 3          # tokens routed on below the token-count level
        self.similarity = similarity
        self.max_clusters = max_clusters
        self.recent = recent
        self.root: dict[int, dict] = {}
        self.clusters: list[_Cluster] = []
        self.cache: dict[str, _Cluster] = {}
        self.records = 0      # records added
        self.dropped = 0      # records of clusters dropped to stay within max_clusters
        self.latest_time = float("-inf")  # the latest record time added
        self._made = 0

    # ---------------------------------------------------------------- adding

    def add(self, record: dict, message: str, level: str | None, time: float) -> str:
        """Place one record (its ``message`` as mined, its ``level``, its epoch ``time``); the anchor of its pattern."""
        masked = mask(key_line(message))
        cluster = self.cache.get(masked)
        if cluster is None:
            cluster = self._place(masked)
            if len(self.cache) >= CACHE:
                self.cache.clear()
            self.cache[masked] = cluster
        self.records += 1
        cluster.count += 1
        if cluster.example is None:
            cluster.example = _kept(record)
        if time < cluster.first:
            cluster.first = time
        if time >= cluster.last:
            cluster.last = time
            cluster.latest = record if cluster.example is record else _kept(record)
        if level is not None:
            rank = level_rank(level)
            if rank is not None and rank > cluster.rank:
                cluster.rank, cluster.level = rank, level
        if time > self.latest_time:
            self.latest_time = time
        horizon = self.latest_time - self.recent
        if time >= horizon:
            second = int(time // 1)
            seconds = cluster.seconds
            bucket = seconds.get(second)
            if bucket is None:
                seconds[second] = [1, time]
                if len(seconds) > 2 * self.recent + 2:   # trim the seconds that fell behind the horizon
                    for old in [s for s in seconds if s < horizon - 1]:
                        del seconds[old]
            else:
                bucket[0] += 1
                if time < bucket[1]:
                    bucket[1] = time
        return cluster.anchor

    def _place(self, masked: str) -> _Cluster:
        tokens = masked.split()
        if len(tokens) > MAX_TOKENS:
            tokens = tokens[:MAX_TOKENS - 1] + ["<...>"]
        leaf = self._leaf(tokens)
        best, best_score = None, -1.0
        size = len(tokens) or 1
        for cluster in leaf:
            # masks and <*> are equal in many places but say nothing of the message: compared as
            # ``fixed`` (the template with them replaced by a token no message holds), not counted
            score = sum(map(operator.eq, cluster.fixed, tokens)) / size
            if score > best_score:
                best, best_score = cluster, score
        if best is not None and best_score >= self.similarity:
            if best.tokens != tokens:
                merged = [a if a == b else WILDCARD for a, b in zip(best.tokens, tokens)]
                if merged != best.tokens:
                    best.set_tokens(merged)
            return best
        if len(self.clusters) >= self.max_clusters:
            self._shed()
            leaf = self._leaf(tokens)
        self._made += 1
        cluster = _Cluster(tokens, f"p{self._made}", leaf, self._made)
        leaf.append(cluster)
        self.clusters.append(cluster)
        return cluster

    def _leaf(self, tokens: list[str]) -> list:
        if not self.prefix:
            return self.root.setdefault(len(tokens), [])  # type: ignore[arg-type]
        node: dict = self.root.setdefault(len(tokens), {})
        route = tokens[:self.prefix]
        for index in range(self.prefix):
            token = route[index] if index < len(route) else ""
            if _variable(token):
                token = WILDCARD
            child = node.get(token)
            if child is None:
                if len(node) >= MAX_CHILDREN and token != WILDCARD:
                    token = WILDCARD
                    child = node.get(token)
                if child is None:
                    child = node[token] = [] if index == self.prefix - 1 else {}
            node = child
        return node  # type: ignore[return-value]  # the last level holds the leaf list

    def _shed(self) -> None:
        """Drop the half of the clusters with the fewest records (the oldest first among equals), so
        that making a cluster costs O(log n) amortised; the cache may point at them: cleared."""
        ranked = sorted(self.clusters, key=lambda c: (c.count, c.last, c.order))
        gone, kept = ranked[:len(ranked) // 2], ranked[len(ranked) // 2:]
        for cluster in gone:
            cluster.leaf.remove(cluster)
            self.dropped += cluster.count
        self.clusters = sorted(kept, key=lambda c: c.order)
        self.cache.clear()

    # ---------------------------------------------------------------- reading

    def top(self, n: int = 10, since: float | None = None) -> list[Pattern]:
        """The ``n`` patterns with the most records, by count (then first seen); with ``since``, only
        the records at or after it are counted (to the second), and patterns without any are left out.
        ``since`` must be within ``recent`` seconds of the latest record added (or before every
        record): older counts are not kept per second."""
        found: list[Pattern] = []
        if since is not None and since > min((c.first for c in self.clusters), default=since) \
                and since < self.latest_time - self.recent:
            raise ValueError(f"since {since}: counts per second are kept for the last {self.recent:g} s "
                             f"before the latest record ({self.latest_time}) only")
        for cluster in self.clusters:
            if since is None or since <= cluster.first:
                found.append(Pattern(self._text(cluster), cluster.count, cluster.first, cluster.last,
                                     cluster.example or {}, cluster.level, cluster.anchor))
                continue
            start = int(since // 1)
            buckets = [bucket for second, bucket in cluster.seconds.items() if second >= start]
            if not buckets:
                continue
            count = sum(bucket[0] for bucket in buckets)
            first = max(min(bucket[1] for bucket in buckets), since) if count else since
            found.append(Pattern(self._text(cluster), count, min(first, cluster.last), cluster.last,
                                 cluster.latest or cluster.example or {}, cluster.level, cluster.anchor))
        found.sort(key=lambda p: (-p.count, p.first, int(p.anchor[1:])))
        return found[:n]

    @staticmethod
    def _text(cluster: _Cluster) -> str:
        return " ".join(cluster.tokens)

    def __len__(self) -> int:
        return len(self.clusters)


def mine(items: Any, **options: Any) -> PatternMiner:
    """A miner fed with (record, message, level, time) tuples: for tests and small uses."""
    miner = PatternMiner(**options)
    for record, message, level, moment in items:
        miner.add(record, message, level, moment)
    return miner
