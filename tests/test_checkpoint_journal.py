"""The checkpoint store's base + journal format: what update()/save() write is what load() reads back,
through crashes at any point (a torn append, between the base and the new journal), damage, a
version-1 file and a removed data_dir. Real files in a temporary directory, no mocks."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipper.durable import write_atomically
from shipper.inputs.checkpoints import (Checkpoint, CheckpointStore, decode_base, encode_base, encode_update,
                                        replay_journal)


def cp(ino: int, offset: int, dev: int = 7) -> Checkpoint:
    return Checkpoint(f"/var/log/app-{ino}.log", dev, ino, offset, 1024, 1000 + ino)


def reload(data_dir, compact_min_lines: int = 4096) -> dict:
    return CheckpointStore(str(data_dir), "app", compact_min_lines).load()


def journal_lines(store: CheckpointStore) -> list[bytes]:
    return Path(store.journal_path).read_bytes().splitlines()


def test_updates_then_load_give_the_state_in_memory_and_only_changes_are_appended(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])  # the first write is a full base and an empty journal
    assert journal_lines(store) == [] and decode_base(Path(store.path).read_bytes())[1] == {
        (7, 1): cp(1, 10), (7, 2): cp(2, 20)}
    store.update([cp(1, 15)], [])
    store.update([cp(2, 20), cp(1, 15)], [])  # equal to what is stored: nothing written
    store.update([cp(3, 0)], [])
    assert len(journal_lines(store)) == 4  # two updates of one change, each with its completion line
    store.update([cp(3, 1), cp(3, 0)], [])  # a key given twice: the last one counts (here: no change)
    assert len(journal_lines(store)) == 4
    assert reload(tmp_path) == {(7, 1): cp(1, 15), (7, 2): cp(2, 20), (7, 3): cp(3, 0)}


def test_a_removed_checkpoint_stays_removed_and_its_key_can_come_back(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([], [(7, 1), (7, 99)])  # an unknown key is ignored
    assert reload(tmp_path) == {(7, 2): cp(2, 20)}
    store.update([cp(1, 5)], [(7, 2)])  # the inode reused by a new file
    assert reload(tmp_path) == {(7, 1): cp(1, 5)}


def test_compaction_bounds_the_journal_and_keeps_everything(tmp_path):
    store = CheckpointStore(str(tmp_path), "app", compact_min_lines=20)
    expected = {}
    for step in range(200):
        changed = [cp(ino, step) for ino in range(step % 7, step % 7 + 3)]
        store.update(changed, [])
        expected.update((c.key, c) for c in changed)
        assert len(journal_lines(store)) <= max(20, len(expected))  # compacted when it passes the bound
    assert reload(tmp_path) == expected
    assert 0 < decode_base(Path(store.path).read_bytes())[0] <= store.seq  # the journal replays the rest


def test_a_torn_last_append_loads_as_the_update_before(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([cp(1, 11)], [])
    good = Path(store.journal_path).read_bytes()
    # The next update cut at every byte: its changes but not its completion line are never applied.
    torn = encode_update(store.seq + 1, [cp(1, 12), cp(2, 21)], [(7, 3)])
    for cut in range(len(torn)):
        Path(store.journal_path).write_bytes(good + torn[:cut])
        assert reload(tmp_path) == {(7, 1): cp(1, 11), (7, 2): cp(2, 20)}, cut
    Path(store.journal_path).write_bytes(good + torn)
    assert reload(tmp_path) == {(7, 1): cp(1, 12), (7, 2): cp(2, 21)}


def test_the_store_goes_on_after_a_torn_journal(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10)], [])
    store.update([cp(1, 11)], [])
    with open(store.journal_path, "ab") as journal:
        journal.write(encode_update(store.seq + 1, [cp(1, 12)], [])[:-5])
    again = CheckpointStore(str(tmp_path), "app")
    assert again.load() == {(7, 1): cp(1, 11)}
    again.update([cp(2, 1)], [])
    again.update([cp(2, 2)], [])
    assert reload(tmp_path) == {(7, 1): cp(1, 11), (7, 2): cp(2, 2)}


def test_a_crash_between_the_new_base_and_the_new_journal_does_not_replay_old_lines(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([cp(3, 30)], [])
    store.update([], [(7, 1)])
    # save([cp(2, 25)]) as the code does it, up to the crash: the new base written, the old journal
    # (which sets cp(3, 30): replayed, it would bring it back) still there.
    write_atomically(store.path, encode_base(store.seq + 1, [cp(2, 25)]))
    assert len(journal_lines(store)) == 4
    assert reload(tmp_path) == {(7, 2): cp(2, 25)}
    # A compaction cut the same way: the base holds what the journal has; nothing is lost or doubled.
    store = CheckpointStore(str(tmp_path), "app")
    state = store.load()
    store.update([cp(4, 40)], [(7, 2)])
    write_atomically(store.path, encode_base(store.seq + 1, [cp(4, 40)]))
    assert reload(tmp_path) == {(7, 4): cp(4, 40)} and state == {(7, 2): cp(2, 25)}


def test_a_version_1_file_loads_and_its_checkpoints_are_kept_by_the_next_writes(tmp_path):
    # Exactly as the previous version wrote it (dataclasses.asdict, sorted by path, indented).
    (tmp_path / "checkpoints").mkdir()
    old = [{"path": "/var/log/a.log", "dev": 7, "ino": 1, "offset": 100, "fp_len": 1024, "fp": 5},
           {"path": "/var/log/b.log", "dev": 7, "ino": 2, "offset": 200, "fp_len": 0, "fp": 0}]
    (tmp_path / "checkpoints" / "file-app.json").write_bytes(
        orjson.dumps({"version": 1, "files": old}, option=orjson.OPT_INDENT_2))
    store = CheckpointStore(str(tmp_path), "app")
    assert store.load() == {(7, 1): Checkpoint(**old[0]), (7, 2): Checkpoint(**old[1])}
    store.update([cp(3, 1)], [])
    assert reload(tmp_path) == {(7, 1): Checkpoint(**old[0]), (7, 2): Checkpoint(**old[1]), (7, 3): cp(3, 1)}
    assert orjson.loads(Path(store.path).read_bytes())["version"] == 2


def test_an_update_before_any_load_keeps_what_is_on_disk(tmp_path):
    CheckpointStore(str(tmp_path), "app").update([cp(1, 10)], [])
    CheckpointStore(str(tmp_path), "app").update([cp(2, 20)], [])
    assert reload(tmp_path) == {(7, 1): cp(1, 10), (7, 2): cp(2, 20)}


def test_data_dir_removed_between_updates_is_made_again_with_everything(tmp_path):
    data = tmp_path / "data"
    store = CheckpointStore(str(data), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([cp(1, 11)], [])
    shutil.rmtree(data)
    store.update([cp(2, 21)], [])
    assert oct(os.stat(data / "checkpoints").st_mode & 0o777) == "0o750"
    assert reload(data) == {(7, 1): cp(1, 11), (7, 2): cp(2, 21)}
    store.update([cp(1, 12)], [])  # and appends to the new journal
    assert len(journal_lines(store)) == 2 and reload(data) == {(7, 1): cp(1, 12), (7, 2): cp(2, 21)}


def test_after_a_failed_write_the_next_update_writes_everything(tmp_path):
    data = tmp_path / "data"
    store = CheckpointStore(str(data), "app")
    store.update([cp(1, 10)], [])
    shutil.rmtree(data)
    data.write_bytes(b"")  # data_dir cannot be made (even as root)
    try:
        store.update([cp(2, 20)], [])
        raise AssertionError("the update cannot have succeeded")
    except OSError:
        pass
    data.unlink()
    store.update([], [])  # nothing new: what failed is written now
    assert reload(data) == {(7, 1): cp(1, 10), (7, 2): cp(2, 20)}


def test_a_symlink_planted_at_the_journal_name_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    store = CheckpointStore(str(tmp_path / "data"), "app")
    os.makedirs(store.directory)
    Path(store.journal_path).symlink_to(victim)
    store.update([cp(1, 10)], [])
    store.update([cp(1, 11)], [])
    assert victim.read_bytes() == b"precious" and not os.path.islink(store.journal_path)
    assert reload(tmp_path / "data") == {(7, 1): cp(1, 11)}


def test_save_rewrites_everything_and_empties_the_journal(tmp_path):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([cp(1, 11)], [])
    assert store.save([cp(2, 22), cp(3, 30)])
    assert journal_lines(store) == [] and reload(tmp_path) == {(7, 2): cp(2, 22), (7, 3): cp(3, 30)}
    assert not store.save([cp(3, 30), cp(2, 22)])  # the same: nothing written
    store.update([cp(3, 31)], [])
    assert reload(tmp_path) == {(7, 2): cp(2, 22), (7, 3): cp(3, 31)}


def test_a_damaged_journal_line_costs_its_update_only_and_is_logged(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10), cp(2, 20)], [])
    store.update([cp(1, 11), cp(2, 21)], [])  # lines 1-3
    store.update([cp(3, 30)], [])  # lines 4-5
    lines = journal_lines(store)
    lines[1] = lines[1].replace(b"21", b"29")  # a flipped byte: its crc no longer matches
    Path(store.journal_path).write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.ERROR):
        assert reload(tmp_path) == {(7, 1): cp(1, 10), (7, 2): cp(2, 20), (7, 3): cp(3, 30)}
    assert [r.getMessage() for r in caplog.records if "journal" in r.getMessage()] == [
        f"checkpoint journal {store.journal_path}: line 2 is damaged; starting without those updates"]


def test_a_damaged_base_is_logged_and_the_journal_still_used(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), "app")
    store.update([cp(1, 10)], [])
    store.update([cp(2, 20)], [])
    Path(store.path).write_bytes(b'{"version": 2, "seq": 1, "files": [{"pa')
    with caplog.at_level(logging.ERROR):
        assert reload(tmp_path) == {(7, 2): cp(2, 20)}
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 1


def test_replay_never_applies_part_of_an_update():
    lines = (encode_update(1, [cp(1, 1)], []) + encode_update(2, [cp(1, 2), cp(2, 2)], [])
             + encode_update(3, [cp(3, 3)], [])).splitlines(keepends=True)
    for damaged in range(len(lines)):
        data = b"".join(b"garbage\n" if i == damaged else line for i, line in enumerate(lines))
        entries: dict = {}
        seq, why = replay_journal(data, 0, entries)
        assert why is not None
        # Each update is there whole or not at all, and only the damaged one is missing.
        update_of = [1, 1, 2, 2, 2, 3, 3][damaged]
        assert entries.get((7, 1)) == (cp(1, 1) if update_of == 2 else cp(1, 2))
        assert ((7, 2) in entries) == (update_of != 2) and ((7, 3) in entries) == (update_of != 3)


# ------------------------------------------------------------------ random sequences against a model

keys = st.integers(1, 6)
checkpoints = st.builds(cp, keys, st.integers(0, 3))
operations = st.lists(st.one_of(
    st.tuples(st.just("update"), st.lists(checkpoints, max_size=4), st.lists(keys, max_size=2)),
    st.tuples(st.just("save"), st.lists(checkpoints, max_size=5)),
    st.tuples(st.just("crash")),  # the process dies between calls
    st.tuples(st.just("torn"), st.lists(checkpoints, min_size=1, max_size=3), st.integers(0, 400)),
    st.tuples(st.just("base_then_crash"), st.lists(checkpoints, max_size=5)),  # inside a save()
    st.tuples(st.just("rmtree")),
), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_random_updates_saves_and_crashes_load_as_the_model(ops):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        store, model = CheckpointStore(data, "app", compact_min_lines=6), {}
        for op in ops:
            if op[0] == "update":
                changed, removed = op[1], [(7, k) for k in op[2]]
                store.update(changed, removed)
                model.update((c.key, c) for c in changed)
                for key in removed:
                    model.pop(key, None)
            elif op[0] == "save":
                store.save(op[1])
                model = {c.key: c for c in op[1]}
            elif op[0] == "rmtree":  # under a running store, which has loaded what was on disk
                store.update([], [])
                shutil.rmtree(data, ignore_errors=True)
                store.update([], [])  # the next update writes everything again
            elif op[0] == "torn":
                # A crash in the middle of the next update's append: a prefix of its lines on disk.
                store.update([], [])  # (a running store: it has its journal)
                torn = encode_update(store.seq + 1, op[1], [])
                with open(store.journal_path, "ab") as journal:
                    journal.write(torn[:min(op[2], len(torn) - 1)])
                store.close()
                store = CheckpointStore(data, "app", compact_min_lines=6)
            elif op[0] == "base_then_crash":
                store.update([], [])
                write_atomically(store.path, encode_base(store.seq + 1, op[1]))
                model = {c.key: c for c in op[1]}
                store.close()
                store = CheckpointStore(data, "app", compact_min_lines=6)
            elif op[0] == "crash":
                store.close()
                store = CheckpointStore(data, "app", compact_min_lines=6)
            if os.path.exists(store.path) or os.path.exists(store.journal_path):
                # What a reader (or the next start) sees is the model, whatever happened before.
                assert CheckpointStore(data, "app").load() == model
                lines = Path(store.journal_path).read_bytes().count(b"\n") if os.path.exists(store.journal_path) else 0
                assert lines <= 6 + 3  # at most 6 keys: compacted past 6 lines, plus a torn update's lines
        store.close()



def test_every_is_never_due_before_its_interval_and_at_most_once_per_interval(monkeypatch):
    """A tailer model runs with an infinite interval: checkpoints only when it saves them itself."""
    from shipper.inputs import checkpoints

    clock = [0.5]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    every = checkpoints.Every(1.0)
    assert not every.due()
    clock[0] = 1.0
    assert [every.due(), every.due()] == [True, False]
    clock[0] = 2.0
    assert every.due()
    assert not checkpoints.Every(float("inf")).due()
