"""Error patterns: similar messages grouped into templates, in the style of the Drain algorithm
(He et al., "Drain: An Online Log Parsing Approach with Fixed Depth Tree", ICWS 2017).

A message's key line (its first line; for a Python traceback, its last line, the exception) is cut
to MAX_LINE characters, its variable parts masked (<TIME>, <UUID>, <IP>, <HEX>, <NUM>) and split into
tokens. A fixed-depth tree routes it by token count, then by its first ``depth - 3`` words that are
neither masks (a line's timestamp) nor level words (depth counts the root, the token-count and the
leaf levels too, as in the paper and drain3; past MAX_CHILDREN branches of a node, further words
share its ``<*>`` branch), to a leaf holding a few clusters. The most similar cluster there (the share of
positions where the template holds the same word, masks and ``<*>`` not counted) takes the
message when its similarity reaches ``similarity``; the template's differing positions become
``<*>``. Else the message starts a new cluster.

Bounded whatever the input: at most ``max_clusters`` clusters (when full, the half with the
fewest records is dropped and its records counted in ``dropped``), at most MAX_LEAF in a leaf (the
rarest dropped: the clusters of a leaf are compared with each new line), one example record per
cluster (its message cut at MAX_EXAMPLE characters), counts per second only for the last
``recent`` seconds (what ``top(since=...)`` needs for "the last 5 minutes before the end"), and a
bounded cache of lines already placed (a line that differs from one before only in its digits costs
a dict lookup, not masking and a tree walk).

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

from shipper.filters import LEVEL_ALIASES, LEVEL_RANKS, level_rank

MAX_LINE = 1000       # characters of the key line mined (the cost and the tokens of one message are bounded)
MAX_TOKENS = 64       # tokens of the key line compared; the rest are one "<...>" token
MAX_CHILDREN = 100    # branches of a tree node before further tokens share the <*> branch
MAX_LEAF = 24         # clusters in one leaf (each is compared with a new line)
MAX_EXAMPLE = 16_384  # characters of an example's message kept
CACHE = 8192          # zeroed key lines remembered with their cluster
WILDCARD = "<*>"
MASK_TOKENS = frozenset(("<*>", "<TIME>", "<UUID>", "<IP>", "<HEX>", "<NUM>", "<...>"))
_NEVER = "\x00"  # no token of a split line is this
_LEVEL_WORDS = frozenset(LEVEL_RANKS) | frozenset(LEVEL_ALIASES)

# Masking works on the key line's UTF-8 bytes with every digit made "0" (one bytes.translate, at C
# speed): lines that differ only in their digits (times, counts, addresses, ids) become the same
# bytes, so the cache of placed lines takes them at the cost of a dict lookup; and the masks only
# look at where the digits are, never at their values, so masking is a function of those bytes.
# Each mask is one re.sub with a constant replacement (no Python call per match) whose pattern
# starts, where it can, with the literal "0", which the regex engine finds at C speed; in this order
# (a UUID, a time and an address hold numbers). A digit left inside a word after them is a number too
# ("user42" -> "user<NUM>", "libc.so.6" -> "libc.so.<NUM>").
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_H = b"[0a-fA-F]"
_TIME = re.compile(rb"0(?<!00)(?:000[-/]00[-/]00(?:[T ]00:00:00)?|0:00:00)(?:[.,]0+)?(?:Z|[+-]00:?00(?!0))?(?!0)")
_UUID = re.compile(_H + rb"(?<![0-9A-Za-z_]" + _H + rb")" + _H + rb"{7}-" + _H + rb"{4}-" + _H + rb"{4}-" + _H +
                   rb"{4}-" + _H + rb"{12}(?![0-9A-Za-z_])")
_IP = re.compile(rb"0(?<![0.]0)0{0,2}\.0{1,3}\.0{1,3}\.0{1,3}(?::0{1,5})?(?![0.])")
# hex: 0x..., or 8 or more hex digits of one case holding a letter and a digit (not a word, not a number).
# Those that start with a letter cost a try at every a-f: looked for only where a cheap search finds a run.
_HEX_DIGIT_FIRST = re.compile(rb"0(?<![0-9A-Za-z_]0)(?:[xX]" + _H + rb"+|(?=0*[a-f])[0a-f]{7,}|(?=0*[A-F])[0A-F]{7,})"
                              rb"(?![0-9A-Za-z_])")
_HEX_RUN = re.compile(rb"[a-fA-F][0a-fA-F]{7}")
_HEX_LETTER_FIRST = re.compile(rb"[a-f](?<![0-9A-Za-z_][a-f])(?=[a-f]*0)[0a-f]{7,}(?![0-9A-Za-z_])"
                               rb"|[A-F](?<![0-9A-Za-z_][A-F])(?=[A-F]*0)[0A-F]{7,}(?![0-9A-Za-z_])")
_NUM = re.compile(rb"0+(?:[.,]0+)*")


_TRACEBACK = "Traceback (most recent call last)"


def key_line(message: str) -> str:
    """The line of ``message`` that names it: the first line, or for a Python traceback (which
    always starts alike) "Traceback ... " and its last line, the exception."""
    first, newline, rest = message.partition("\n")
    if newline and first.startswith(_TRACEBACK):
        last = rest.rstrip().rpartition("\n")[2].strip()
        first = f"Traceback ... {last}" if last else first
    return first[:MAX_LINE]


def zeroed(line: str) -> bytes:
    """``line`` as UTF-8 with its digits made "0": what the cache and the masks see."""
    return line.encode("utf-8", "surrogatepass").translate(_ZEROS)


def masked(key: bytes) -> str:
    """The zeroed key line with its variable parts replaced by <TIME>, <UUID>, <IP>, <HEX>, <NUM>."""
    if key.count(b"-") >= 4:   # a UUID holds 4 dashes
        key = _UUID.sub(b"<UUID>", key)
    if b"0" in key:            # every other mask holds a digit
        key = _TIME.sub(b"<TIME>", key)
        if b"." in key:
            key = _IP.sub(b"<IP>", key)
        key = _HEX_DIGIT_FIRST.sub(b"<HEX>", key)
        if _HEX_RUN.search(key) is not None:
            key = _HEX_LETTER_FIRST.sub(b"<HEX>", key)
        key = _NUM.sub(b"<NUM>", key)
    return key.decode("utf-8", "surrogatepass")


def mask(line: str) -> str:
    """``line`` with its variable parts replaced by <TIME>, <UUID>, <IP>, <HEX>, <NUM>."""
    return masked(zeroed(line))


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
        self.leaf: list | None = leaf   # None once dropped
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
        self.clusters: dict[int, _Cluster] = {}   # by creation order
        self.cache: dict[str, _Cluster] = {}
        self.records = 0      # records added
        self.dropped = 0      # records of clusters dropped to stay within max_clusters
        self.latest_time = float("-inf")  # the latest record time added
        self._made = 0

    # ---------------------------------------------------------------- adding

    def add(self, record: dict, message: str, level: str | None, time: float) -> str:
        """Place one record (its ``message`` as mined, its ``level``, its epoch ``time``); the anchor of its pattern."""
        key = zeroed(key_line(message))
        cluster = self.cache.get(key)
        if cluster is None or cluster.leaf is None:  # (None: dropped since)
            cluster = self._place(masked(key))
            if len(self.cache) >= CACHE:
                self.cache.clear()
            self.cache[key] = cluster
        self.records += 1
        cluster.count += 1
        small = len(message) <= MAX_EXAMPLE   # (the record's message, as a rule)
        if cluster.example is None:
            cluster.example = record if small else _kept(record)
        if time < cluster.first:
            cluster.first = time
        if time >= cluster.last:
            cluster.last = time
            cluster.latest = record if small else _kept(record)
        if level is not None:
            rank = LEVEL_RANKS.get(level)
            if rank is None:
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

    def _place(self, text: str) -> _Cluster:
        tokens = text.split()
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
        if len(leaf) >= MAX_LEAF:  # a leaf's clusters are compared one by one: bounded, the rarest goes
            self._drop(min(leaf, key=lambda c: (c.count, c.last, c.order)))
        if len(self.clusters) >= self.max_clusters:
            self._shed()
        self._made += 1
        cluster = _Cluster(tokens, f"p{self._made}", leaf, self._made)
        leaf.append(cluster)
        self.clusters[cluster.order] = cluster
        return cluster

    def _leaf(self, tokens: list[str]) -> list:
        if not self.prefix:
            return self.root.setdefault(len(tokens), [])  # type: ignore[arg-type]
        node: dict = self.root.setdefault(len(tokens), {})
        # routed on the first words that say what the line is: not a mask (a line's timestamp),
        # not a level word (ERROR, [warn]), which would put most lines of a log in one leaf
        route = [token for token in tokens[:self.prefix + 4] if "<" not in token
                 and token.strip("[]():").lower() not in _LEVEL_WORDS][:self.prefix]
        for index in range(self.prefix):
            token = route[index] if index < len(route) else ""
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
        that making a cluster costs O(log n) amortised."""
        ranked = sorted(self.clusters.values(), key=lambda c: (c.count, c.last, c.order))
        for cluster in ranked[:len(ranked) // 2]:
            self._drop(cluster)

    def _drop(self, cluster: _Cluster) -> None:
        cluster.leaf.remove(cluster)
        cluster.leaf = None   # the cache may still point at it: a miss
        del self.clusters[cluster.order]
        self.dropped += cluster.count

    # ---------------------------------------------------------------- reading

    def top(self, n: int = 10, since: float | None = None) -> list[Pattern]:
        """The ``n`` patterns with the most records, by count (then first seen); with ``since``, only
        the records at or after it are counted (to the second), and patterns without any are left out.
        ``since`` must be within ``recent`` seconds of the latest record added (or before every
        record): older counts are not kept per second."""
        found: list[Pattern] = []
        if since is not None and since > min((c.first for c in self.clusters.values()), default=since) \
                and since < self.latest_time - self.recent:
            raise ValueError(f"since {since}: counts per second are kept for the last {self.recent:g} s "
                             f"before the latest record ({self.latest_time}) only")
        for cluster in self.clusters.values():
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
