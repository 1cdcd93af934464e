"""The reader's own inotify instance (content_events.ModifiedFiles): which files were written."""

import os

from shipper.inputs.content_events import ModifiedFiles


def test_names_the_files_written_or_truncated_and_only_those(tmp_path):
    quiet, busy, cut = (tmp_path / name for name in ("quiet.log", "busy.log", "cut.log"))
    for path in (quiet, busy, cut):
        path.write_text("first\n")
    events = ModifiedFiles()
    try:
        assert events.watch(str(tmp_path)) and events.watch(str(tmp_path))  # once is enough
        assert events.drain() == set()
        with open(busy, "a") as handle:
            handle.write("second\n")
        os.truncate(cut, 0)
        assert events.drain() == {str(busy), str(cut)}
        assert events.drain() == set()  # each write is named once
    finally:
        events.close()


def test_a_directory_removed_and_made_again_is_watched_again(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    events = ModifiedFiles()
    try:
        assert events.watch(str(logs))
        logs.rmdir()
        assert events.drain() == set()  # its watch ended (IN_IGNORED)
        logs.mkdir()
        assert events.watch(str(logs))
        (logs / "new.log").write_text("line\n")
        assert events.drain() == {str(logs / "new.log")}
    finally:
        events.close()


def test_a_directory_that_cannot_be_watched_is_reported_for_polling(tmp_path):
    missing = tmp_path / "not-yet"
    events = ModifiedFiles()
    try:
        assert not events.watch(str(missing))
        assert events.unwatched == {str(missing)}
        missing.mkdir()
        events.retry_unwatched()
        assert events.unwatched == set()
        (missing / "a.log").write_text("line\n")
        assert events.drain() == {str(missing / "a.log")}
    finally:
        events.close()


def test_relative_paths_stay_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.log").write_text("")
    events = ModifiedFiles()
    try:
        assert events.watch(os.path.dirname("app.log"))  # "" is the working directory
        with open("app.log", "a") as handle:
            handle.write("line\n")
        assert events.drain() == {"app.log"}
    finally:
        events.close()
