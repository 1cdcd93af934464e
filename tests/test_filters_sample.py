"""sample: 1 in N by a count across batches, or consistently by a key; keep_level; counted."""

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.config import Settings
from shipper.filters import FilterContext
from shipper.filters.sample import SampleFilter, keyed_keep
from shipper.record import PARSED, Batch
from shipper.stats import Stats


def make(rate, key=None, keep_level=None):
    stats = Stats()
    values = {"type": "sample", "match": ["*"], "rate": rate, "key": key, "keep_level": keep_level}
    settings = Settings("filters[3]", values)
    assert SampleFilter.problems(settings, "filters[3]") == []
    return SampleFilter(settings, FilterContext("sample.3", stats)), stats


def blob(lines, tag="web"):
    return Batch(tag, "/var/log/web.log", 0.0, blob="".join(f"{line}\n" for line in lines).encode())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.lists(st.integers(0, 9), max_size=8))
def test_one_in_n_across_batches_of_any_size(rate, sizes):
    sampler, stats = make(rate)
    numbered = iter(range(10**6))
    kept = []
    for size in sizes:
        kind = size % 2  # blobs and records alike share the count
        lines = [str(next(numbered)) for _ in range(size)]
        batch = blob(lines) if kind else Batch("web", None, 0.0, messages=lines)
        [out] = sampler.apply(batch)
        kept += out.message_list()
    total = sum(sizes)
    assert kept == [str(i) for i in range(0, total, rate)]
    assert stats.get("records_dropped", reason="sampled", filter="sample.3", input="web") == total - len(kept)


def test_rate_one_keeps_everything_untouched():
    sampler, stats = make(1)
    batch = blob(["a", "b"])
    assert sampler.apply(batch) == [batch]
    assert stats.get("records_dropped") == 0


def test_consistent_by_key_keeps_or_drops_a_request_together():
    sampler, _ = make(3, key="request_id")
    ids = [f"req-{i}" for i in range(30)]
    batch = Batch("web", None, 0.0, messages=[f"{i} line {n}" for i in ids for n in range(3)],
                  fields=[{PARSED: {"request_id": i}} for i in ids for n in range(3)])
    [out] = sampler.apply(batch)
    kept_ids = {f[PARSED]["request_id"] for f in out.fields}
    assert kept_ids == {i for i in ids if zlib.crc32(i.encode()) % 3 == 0}
    assert 0 < len(kept_ids) < len(ids)
    assert all(sum(m.startswith(f"{i} ") for m in out.messages) == 3 for i in kept_ids)  # all three lines
    # the same decision in another agent (a fresh filter, another batch order)
    other, _ = make(3, key="request_id")
    [again] = other.apply(Batch("web", None, 0.0, messages=list(reversed(batch.messages)),
                                fields=list(reversed(batch.fields))))
    assert {f[PARSED]["request_id"] for f in again.fields} == kept_ids


def test_records_without_the_key_fall_back_to_the_count():
    sampler, _ = make(2, key="request_id")
    batch = Batch("web", None, 0.0, messages=["a", "b", "c", "d"], fields=[None, {PARSED: {}}, None, None])
    assert sampler.apply(batch)[0].messages == ["a", "c"]


def test_key_tag_or_source_on_plain_lines_decides_the_whole_blob():
    sampler, _ = make(5, key="source")
    keep = keyed_keep("/var/log/web.log", 5)
    assert sampler.apply(blob(["a", "b"]))[0].count == (2 if keep else 0)


def test_keep_level_is_never_sampled_out():
    sampler, stats = make(1000, keep_level="warn")
    levels = ["info", "warning", "debug", "error", "info", "critical"]
    batch = Batch("web", None, 0.0, messages=levels, fields=[{PARSED: {"level": v}} for v in levels])
    [out] = sampler.apply(batch)
    assert out.messages == ["info", "warning", "error", "critical"]  # the first by the count, then >= warn
    assert stats.get("records_dropped", reason="sampled") == 2


def test_problems():
    settings = Settings("filters[3]", {"rate": 2, "key": "", "keep_level": None})
    assert SampleFilter.problems(settings, "filters[3]")[0].startswith("filters[3].key:")


def test_keep_level_keeps_plain_lines_whose_detected_level_is_high_enough():
    sampler, stats = make(1000, keep_level="warn")
    lines = ["INFO a", "WARN b", "INFO c", "ERROR d", "DEBUG e"]
    [out] = sampler.apply(blob(lines))
    assert out.message_list() == ["INFO a", "WARN b", "ERROR d"]  # the first by the count, the rest by level
    assert out.fields is None
    assert stats.get("records_dropped", reason="sampled", filter="sample.3", input="web") == 2
