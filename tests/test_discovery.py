import os

from shipper.inputs.discovery import expand, is_excluded, watch_root


def test_expand_globs_with_excludes_and_recursion(tmp_path):
    for name in ["a.log", "b.log.gz", "sub/c.log", "sub/deep/d.log", "notes.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    (tmp_path / "dir.log").mkdir()  # a directory is never tailed
    found = expand([f"{tmp_path}/*.log*", f"{tmp_path}/**/*.log"], ["*.gz", f"{tmp_path}/sub/deep/*"])
    assert found == [f"{tmp_path}/a.log", f"{tmp_path}/sub/c.log"]


def test_excludes_match_the_path_or_the_name():
    assert is_excluded("/var/log/app/x.gz", ["*.gz"])
    assert is_excluded("/var/log/app/x.log", ["/var/log/app/*"])
    assert not is_excluded("/var/log/app/x.log", ["x.gz", "/var/log/other/*"])


def test_watch_roots():
    assert watch_root("/var/log/app/*.log") == ("/var/log/app", False)
    assert watch_root("/var/log/*/web.log") == ("/var/log", True)
    assert watch_root("/var/log/**/*.log") == ("/var/log", True)
    assert watch_root("relative/*.log") == ("relative", False)
    assert watch_root("*.log") == (".", False)
    assert watch_root(os.sep + "x.log") == (os.sep, False)
