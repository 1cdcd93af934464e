"""Placeholder values never lead an object out of the archive root (issue 12, finding 13).

Tags, labels, host and instance names come from outside the key template (the environment,
IMDS, the configuration of other people): whatever they hold ('..', '/', NUL, control
characters, leading dots, thousands of characters), the rendered key stays a relative path
of ordinary segments under the root.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import agent_config, read_archive, seq_lines, seqs, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.outputs.keys import DEFAULT_KEY, check_template, key_values, render_key

TEMPLATES = [
    DEFAULT_KEY,
    "{prefix}/" + DEFAULT_KEY,
    "{labels.a}/{labels.b}/{host}/{tag}-{seq}.ndjson{ext}",
    "{labels.a}{labels.b}/{tag}{labels.a}/{seq}",       # values side by side: '.' + '.' must not make '..'
    "x{tag}/{labels.a}.{seq}{ext}",
    "{prefix}{labels.a}/{instance_id}_{seq}",
]
hostile = st.one_of(st.sampled_from(["..", ".", "../../..", "/", "/etc/passwd", "\x00", ".tmp", "", "a/../../b",
                                     "\n\x1b[31m", "..\x00..", "~", "-"]),
                    st.text(max_size=40), st.text(max_size=400, alphabet="./\x00\\"), st.text(min_size=300))


def test_the_templates_used_here_are_valid():
    assert [t for t in TEMPLATES if check_template(t)] == []
    assert check_template("{tag}/../{seq}") and check_template(".hidden/{seq}")


@settings(max_examples=400, deadline=None)
@given(template=st.sampled_from(TEMPLATES), tag=hostile, a=hostile, b=hostile, host=hostile, instance=hostile,
       prefix=hostile)
def test_a_rendered_key_never_leaves_the_root(template, tag, a, b, host, instance, prefix):
    values = key_values(1764422238.5, tag, {"host": host, "instance_id": instance}, 7, "gzip", prefix)
    key = render_key(template, values, {"a": a, "b": b})
    segments = key.split("/")
    assert key and not key.startswith("/") and not os.path.isabs(key)
    assert all(seg and seg.strip(".") and not seg.startswith(".") for seg in segments), key
    assert all(len(seg.encode()) <= 255 for seg in segments) and len(key.encode()) <= 1024
    assert key.isascii() and key.isprintable(), key  # no NUL, no control character
    root = "/srv/archive"
    assert os.path.normpath(os.path.join(root, key)).startswith(root + "/") and os.path.normpath(key) == key


def test_ordinary_values_are_kept_as_they_are():
    values = key_values(1764422238.5, "nginx.access", {"host": "web-1", "instance_id": "i-0abc"}, 7, "zstd",
                        "logs/prod")
    assert render_key("{prefix}/" + DEFAULT_KEY, values, {}) == \
        "logs/prod/dt=2025-11-29/hour=13/instance=i-0abc/nginx.access/20251129T131718Z-000007.ndjson.zst"
    assert render_key("{labels.team}/{seq}", values, {"team": "a" * 150}) != \
        render_key("{labels.team}/{seq}", values, {"team": "a" * 149 + "b"})  # cut long values stay apart


def test_labels_with_dot_dot_do_not_lead_the_directory_output_out_of_its_archive(run_agent, workdir):
    archive = workdir / "data" / "deep" / "er" / "still" / "archive"
    key = "{labels.up}/{labels.up}/{labels.up}/{labels.path}/{tag}-{seq}.ndjson{ext}"
    config = agent_config(workdir / "logs", workdir / "data", output=f'''
[[outputs]]
type = "directory"
path = "{archive}"
key = "{key}"
upload_interval = "200ms"
''')
    config = config.replace("[cloud]", '[agent.labels]\nup = ".."\npath = "../../.."\n\n[cloud]')
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 200))
    agent = run_agent(config)
    outside = workdir / "data"

    def escaped() -> list[Path]:
        return [p for p in outside.rglob("*.ndjson*") if archive not in p.parents]

    wait_for(lambda: escaped() or sorted(seqs(read_archive(archive))) == list(range(200)),
             message="200 lines in the archive (or an object outside it)")
    assert escaped() == []
    assert agent.stop() == 0
    records = read_archive(archive)
    assert sorted(seqs(records)) == list(range(200))
    assert records[0]["labels"] == {"up": "..", "path": "../../.."}  # the records keep the values as they are
    objects = [p.relative_to(archive) for p in archive.rglob("*.ndjson*") if ".tmp" not in p.parts]
    assert objects and all(str(p).startswith("__/__/__/___.._../app-") for p in objects), objects
