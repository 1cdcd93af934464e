"""`shipper check --sample FILE`: the config's filters over a file's lines, as its input reads them."""

import subprocess
import sys

import orjson


def config(tmp_path, parser="none", filters=None):
    filters = filters if filters is not None else """
[[filters]]
type = "grep"
rules = [{ exclude = 'GET /health' }]
[[filters]]
type = "modify"
match = ["app"]
tag_regex = '\\bERROR\\b'
tag = "app.errors"
"""
    path = tmp_path / "shipper.toml"
    path.write_text(f"""
[agent]
data_dir = "{tmp_path}/data"
[agent.labels]
app = "web"
[[inputs]]
type = "file"
tag = "app"
paths = ["{tmp_path}/logs/*.log"]
parser = "{parser}"
{filters}
[[outputs]]
type = "directory"
path = "{tmp_path}/archive"
[[outputs]]
type = "directory"
match = ["app.errors"]
path = "{tmp_path}/errors"
""")
    return path


def check(*args):
    return subprocess.run([sys.executable, "-m", "shipper", "check", *map(str, args)], capture_output=True, text=True)


def route_records(out: str, where: str) -> list[dict]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"route {where} "))
    records = []
    for line in lines[start + 1:]:
        if not line.startswith("  {"):
            break
        records.append(orjson.loads(line))
    return records


def test_sample_prints_each_route_and_each_filter(tmp_path):
    (tmp_path / "logs").mkdir()
    sample = tmp_path / "logs" / "app.log"
    sample.write_text("GET /health 200\nERROR db down\nINFO ok\nGET /healthz 200\nlast line without newline")
    result = check("-c", config(tmp_path), "--sample", sample)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "route: app -> grep.0 -> modify.1 -> outputs[0]" in out  # the chain per route
    assert f"sample: {sample}, as inputs[0] reads it (tag app, parser none)" in out
    assert "read: 5 records" in out
    assert "  grep.0: 2 filtered; 0 changed or made" in out and "    - [app] GET /health 200" in out
    assert "  modify.1: 0 dropped; 1 changed or made" in out and "    + [app.errors] ERROR db down" in out
    assert [(r["tag"], r["message"]) for r in route_records(out, "outputs[0]")] == [
        ("app", "INFO ok"), ("app", "last line without newline"), ("app.errors", "ERROR db down")]
    assert [r["message"] for r in route_records(out, "outputs[1]")] == ["ERROR db down"]
    assert route_records(out, "outputs[0]")[0]["labels"] == {"app": "web"}
    assert out.rstrip().endswith("totals: read 5, dropped 2, left 3 (tag app: 2, tag app.errors: 1)")
    assert not (tmp_path / "data").exists() and not (tmp_path / "archive").exists()  # nothing written


def test_sample_uses_the_inputs_parser_when_its_paths_take_the_file(tmp_path):
    (tmp_path / "logs").mkdir()
    sample = tmp_path / "logs" / "app.log"
    sample.write_text('{"level":"debug","msg":"a"}\n{"level":"error","msg":"b"}\nnot json\n')
    filters = '[[filters]]\ntype = "grep"\nrules = [{ exclude = "debug", field = "level" }]\n'
    result = check("-c", config(tmp_path, parser="json", filters=filters), "--sample", sample)
    assert result.returncode == 0, result.stderr
    shipped = route_records(result.stdout, "outputs[0]")
    assert [(r.get("level"), r.get("msg"), r.get("parse_error")) for r in shipped] == [
        ("error", "b", None), (None, None, True)]


def test_a_file_no_input_reads_is_plain_lines_with_the_given_tag(tmp_path):
    sample = tmp_path / "elsewhere.txt"
    sample.write_text("ERROR x\n" + "line\n" * 30)
    result = check("-c", config(tmp_path), "--sample", sample, "--tag", "app.errors", "--limit", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "as plain lines, tag app.errors" in out
    assert "route outputs[1] (directory" in out and "31 records" in out
    assert "  ... 30 more (--limit)" in out
    assert "  modify.1: not applied (its match app took no record's tag)" in out


def test_a_sample_that_cannot_be_read(tmp_path):
    result = check("-c", config(tmp_path), "--sample", tmp_path / "missing.log")
    assert result.returncode == 1
    assert "--sample" in result.stderr and "cannot read" in result.stderr
