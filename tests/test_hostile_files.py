"""Special files and symlinks among the globs (issue 12, findings 3 and 4).

Only regular files are opened, never in blocking mode (a FIFO swapped over a watched file hung
the file input in open() for good), and symlinks below a pattern's fixed directories are not
followed unless ``follow_symlinks = true``: whoever can write a log directory must not be
able to pull other files into the archive.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aws import free_port
from conftest import agent_config, messages, read_archive, seq_lines, seqs, wait_for
from shipper.inputs.discovery import NOT_REGULAR, SYMLINK, TOO_DEEP, Skips, expand, fixed_root, matches
from shipper.inputs.tail import NotTailable, open_regular
from shipper.stats import Stats

SECRET = "s3cr3t-do-not-ship"


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    """logs/ with a regular file, a FIFO, a socket, a symlink to a secret file outside and a
    symlinked directory holding another; outside/ with the secrets."""
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    (outside / "secret.log").write_text(SECRET + "\n")
    (outside / "dir" / "deep.log").write_text(SECRET + " deep\n")
    (logs / "app.log").write_text("ok\n")
    (logs / "sub").mkdir()
    (logs / "sub" / "inner.log").write_text("inner\n")
    os.mkfifo(logs / "pipe.log")
    (logs / "link.log").symlink_to(outside / "secret.log")
    (logs / "linked").symlink_to(outside / "dir")
    (logs / "loop").symlink_to(logs)  # a link back up: glob would walk it again and again
    return logs, outside


def test_only_regular_files_without_symlinks_are_found_each_skip_reported_once(tmp_path):
    logs, outside = make_tree(tmp_path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(logs / "sock.log"))
    try:
        stats = Stats()
        skips = Skips(stats, "app")
        patterns = [f"{logs}/*.log", f"{logs}/**/*.log"]
        for _ in range(3):  # rescans report nothing new
            assert expand(patterns, [], skips=skips) == [f"{logs}/app.log", f"{logs}/sub/inner.log"]
        assert skips.reported == {f"{logs}/pipe.log": NOT_REGULAR, f"{logs}/sock.log": NOT_REGULAR,
                                  f"{logs}/link.log": SYMLINK, f"{logs}/linked": SYMLINK, f"{logs}/loop": SYMLINK}
        assert stats.get("files_skipped", input="app", reason="not_regular") == 2
        assert stats.get("files_skipped", input="app", reason="symlink") == 3
        (logs / "link.log").unlink()  # gone: forgotten, so a new link there is news again
        expand(patterns, [], skips=skips)
        assert f"{logs}/link.log" not in skips.reported
    finally:
        server.close()


@pytest.mark.timeout(20)
def test_with_follow_symlinks_links_are_followed_to_regular_files_and_loops_end(tmp_path):
    logs, outside = make_tree(tmp_path)
    found = expand([f"{logs}/*.log", f"{logs}/**/*.log"], [], follow_symlinks=True)
    assert found == [f"{logs}/app.log", f"{logs}/link.log", f"{logs}/linked/deep.log", f"{logs}/sub/inner.log"]
    kinds = dict(matches(f"{logs}/**/*.log", follow_symlinks=True))
    assert kinds[f"{logs}/pipe.log"] == NOT_REGULAR  # a FIFO stays skipped, link or not
    # Two links to the same directory and links back up: each directory is walked once.
    for n in range(8):
        (logs / "sub" / f"up{n}").symlink_to(logs)
    assert len(list(matches(f"{logs}/**/*.log", follow_symlinks=True))) == 5


def test_a_directory_chain_deeper_than_the_stack_is_walked_to_a_bound_and_reported(tmp_path):
    depth = 1100  # glob recursed once per level: RecursionError, and the file input thread was gone
    fds = [os.open(tmp_path, os.O_RDONLY)]
    try:
        for _ in range(depth):  # by descriptors: the whole path is too long for most tools
            os.mkdir("d", dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
        os.close(os.open("x.log", os.O_CREAT | os.O_WRONLY, dir_fd=fds[-1]))
        (tmp_path / "top.log").write_text("x\n")
        stats = Stats()
        skips = Skips(stats, "app")
        assert expand([f"{tmp_path}/**/*.log"], [], skips=skips) == [f"{tmp_path}/top.log"]
        assert list(skips.reported.values()) == [TOO_DEEP] and stats.get("files_skipped", reason="too_deep") == 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("x.log", dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("d", dir_fd=fds[-1])
        os.close(fds[0])


def test_symlinks_in_the_fixed_part_of_a_pattern_are_the_operators_and_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.log").write_text("a\n")
    (tmp_path / "named").symlink_to(real)
    assert expand([f"{tmp_path}/named/*.log"], []) == [f"{tmp_path}/named/a.log"]
    assert fixed_root(f"{tmp_path}/named/a.log", [f"{tmp_path}/named/*.log", f"{tmp_path}/**"]) == f"{tmp_path}/named"
    fd = open_regular(f"{tmp_path}/named/a.log", root=f"{tmp_path}/named")
    try:
        assert os.read(fd, 10) == b"a\n"
    finally:
        os.close(fd)


@pytest.mark.timeout(20)
def test_open_regular_never_blocks_and_refuses_what_is_not_a_regular_file(tmp_path):
    logs, outside = make_tree(tmp_path)
    with pytest.raises(NotTailable) as fifo:  # opened in blocking mode this waited for a writer forever
        open_regular(str(logs / "pipe.log"), root=str(logs))
    assert fifo.value.reason == "not_regular" and "FIFO" in str(fifo.value)
    with pytest.raises(NotTailable) as link:
        open_regular(str(logs / "link.log"), root=str(logs))
    assert link.value.reason == "symlink"
    # A directory that became a symlink after the scan is not gone through either.
    with pytest.raises(NotTailable) as through:
        open_regular(str(logs / "linked" / "deep.log"), root=str(logs))
    assert through.value.reason == "symlink"
    (logs / "pipe-link.log").symlink_to(logs / "pipe.log")
    with pytest.raises(NotTailable) as followed_fifo:
        open_regular(str(logs / "pipe-link.log"), follow_symlinks=True, root=str(logs))
    assert followed_fifo.value.reason == "not_regular"
    fd = open_regular(str(logs / "link.log"), follow_symlinks=True, root=str(logs))
    try:
        assert os.read(fd, 100) == (SECRET + "\n").encode()
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_regular(str(logs / "missing.log"), root=str(logs))


# ---------------------------------------------------------------- the agent as a subprocess

def metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def skipped(port: int, reason: str) -> float:
    return metrics(port).get(("shipper_files_skipped_total", (("input", "app"), ("reason", reason))), 0)


@pytest.mark.timeout(120)
def test_fifos_in_the_globs_and_swapped_over_a_file_never_stop_the_tailing(workdir, run_agent):
    logs = workdir / "logs"
    (logs / "app.log").write_text(seq_lines(0, 10))
    os.mkfifo(logs / "pipe.log")
    port = free_port()
    agent = run_agent(agent_config(logs, workdir / "data", server=f'listen = "127.0.0.1:{port}"'))
    wait_for(lambda: seqs(read_archive(workdir / "data" / "archive")) == list(range(10)), message="app.log")
    # Swap FIFOs and files over app.log for a while: each swap is an inotify event and a scan, and
    # sooner or later one lands between the scan seeing a file and the open (which then got a FIFO).
    stop = threading.Event()

    def swap() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            os.mkfifo(logs / "swap.fifo")
            os.rename(logs / "swap.fifo", logs / "app.log")
            (logs / "swap.file").write_text("")
            os.rename(logs / "swap.file", logs / "app.log")
            if n % 50 == 0:
                time.sleep(0.001)

    swapper = threading.Thread(target=swap)
    swapper.start()
    time.sleep(4)
    stop.set()
    swapper.join()
    os.mkfifo(logs / "swap.fifo")
    os.rename(logs / "swap.fifo", logs / "app.log")  # it ends as a FIFO
    (logs / "new.log").write_text(seq_lines(10, 20))  # created afterwards: still tailed
    wait_for(lambda: sorted(seqs(read_archive(workdir / "data" / "archive"))) == list(range(30)),
             timeout=30, message="new.log, created after the FIFOs")
    assert skipped(port, "not_regular") >= 2  # pipe.log, app.log as a FIFO
    assert agent.log().count(f"not tailing {logs}/pipe.log") == 1
    assert agent.stop() == 0


@pytest.mark.parametrize("follow", [False, True])
def test_a_symlink_to_a_file_outside_the_globs_is_not_shipped_unless_followed(workdir, run_agent, follow):
    logs, outside = make_tree(workdir)
    (logs / "app.log").write_text(seq_lines(0, 5))
    port = free_port()
    config = agent_config(logs, workdir / "data", pattern="**/*.log", server=f'listen = "127.0.0.1:{port}"',
                          input_extra="follow_symlinks = true" if follow else "")  # false: the default
    agent = run_agent(config)
    archive = workdir / "data" / "archive"
    wait_for(lambda: list(range(5)) == seqs(read_archive(archive)), message="app.log")
    (logs / "late.log").write_text(seq_lines(5, 1))  # found by a later scan, which saw the links again
    wait_for(lambda: 5 in seqs(read_archive(archive)), message="late.log")
    wait_for(lambda: "inner" in messages(read_archive(archive)), message="sub/inner.log")
    shipped = messages(read_archive(archive))
    if follow:
        wait_for(lambda: {SECRET, SECRET + " deep"} <= set(messages(read_archive(archive))),
                 message="the linked files")
    else:
        assert not any(SECRET in m for m in shipped)
        assert skipped(port, "symlink") == 3  # link.log, linked/, loop/
        assert agent.log().count(f"not tailing {logs}/link.log") == 1
    assert skipped(port, "not_regular") == 1  # pipe.log
    assert agent.stop() == 0
    if not follow:
        assert not any(SECRET in m for m in messages(read_archive(archive)))
