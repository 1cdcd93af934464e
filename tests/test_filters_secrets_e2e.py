"""End to end with the agent as a subprocess: a secret written to a log never reaches an output (a
directory archive and S3 on moto), nor anything under data_dir (the S3 disk spool included): the
redact filter runs before routing, so nothing downstream ever holds the secret."""

import gzip
from pathlib import Path

import pytest
from aws import s3_output
from conftest import FAST_RETRIES, agent_config, checkpoint_offsets, read_archive, wait_for

SECRETS = ["AKIAIOSFODNN7EXAMPLE", "hunter2xyz", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
           "4111 1111 1111 1111", "eyJzdWIiOiIxMjM0NTY3ODkwIn0", "MIIEowIBAAKCAQEAx5bQ", "Zm9vYmFyYmF6cXV4",
           "abcdefghijklmnopqrstu", "s3cr3tInJson",
           # camelCase, escaped JSON, a number under a secret name, a key in a read with an invalid byte
           "camelPw123", "escPw456", "918273645", "MIIEpQIBAAKCAQEAmixedBody", "QmFzZTY0TWl4ZWQ"]
PLAIN = """starting up
login user=bob password=hunter2xyz ok
creds AKIAIOSFODNN7EXAMPLE aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
paid 4111 1111 1111 1111 thanks
session eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U
-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAx5bQ
Zm9vYmFyYmF6cXV4
-----END RSA PRIVATE KEY-----
done
"""
JSON = ('{"msg":"call","auth":"Bearer abcdefghijklmnopqrstu","password":"s3cr3tInJson","n":1}\n'
        '{"msg":"plain","n":2}\n'
        '{"msg":"signup","userPassword":"camelPw123","body":"{\\"password\\": \\"escPw456\\"}","dbPassword":918273645}\n')
# one byte that is not UTF-8: the read becomes a general batch, the key block must still be redacted
MIXED = (b"caf\xe9 starting\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpQIBAAKCAQEAmixedBody\nQmFzZTY0TWl4ZWQ=\n"
         b"-----END RSA PRIVATE KEY-----\nok\n")


def everything_under(root: Path) -> bytes:
    """The bytes of every file below ``root``, gzip objects decompressed."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            found.append(data)
    return b"\n".join(found)


@pytest.mark.timeout(120)
def test_a_secret_never_reaches_an_output_nor_data_dir(workdir, run_agent, aws):
    logs, data = workdir / "logs", workdir / "data"
    (logs / "app.log").write_text(PLAIN)
    (logs / "api.json").write_text(JSON)
    (logs / "mixed.log").write_bytes(MIXED)
    aws.s3.create_bucket(Bucket="fleet-logs")
    output = f"""
[[outputs]]
type = "directory"
path = "{data}/archive"
upload_interval = "200ms"
{s3_output(aws.endpoint, "fleet-logs")}
[[filters]]
type = "redact"
[[filters]]
type = "level"

[[inputs]]
type = "file"
tag = "api"
parser = "json"
paths = ["{logs}/*.json"]
poll_interval = "50ms"
"""
    agent = run_agent(agent_config(logs, data, output=output, agent_extra=FAST_RETRIES), env=aws.env)
    wait_for(lambda: checkpoint_offsets(workdir).get(str(logs / "app.log")) == len(PLAIN), message="app.log read")

    def bucket() -> list[bytes]:
        listing = aws.s3.list_objects_v2(Bucket="fleet-logs").get("Contents", [])
        return [gzip.decompress(aws.s3.get_object(Bucket="fleet-logs", Key=o["Key"])["Body"].read())
                for o in listing]

    wait_for(lambda: sum(body.count(b"\n") for body in bucket()) == 19, message="19 records in S3", timeout=60)
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    by_message = {r["message"]: r for r in records}
    assert "login user=bob password=[REDACTED:password] ok" in by_message
    assert "creds [REDACTED:aws_access_key_id] aws_secret_access_key=[REDACTED:aws_secret_key]" in by_message
    assert "paid [REDACTED:credit_card] thanks" in by_message
    assert [r["message"] for r in records if r["tag"] == "app"][5:9] == ["[REDACTED:private_key]"] * 4
    api = [r for r in records if r["tag"] == "api"]
    assert api[0]["auth"] == "Bearer [REDACTED:bearer]" and api[0]["password"] == "[REDACTED:password]"
    mixed = [r["message"] for r in records if r.get("source", "").endswith("mixed.log")]
    assert mixed[1:] == ["[REDACTED:private_key]"] * 4 + ["ok"]
    assert api[2]["userPassword"] == api[2]["dbPassword"] == "[REDACTED:password]"
    assert len(records) == 19
    stored = everything_under(data) + b"\n".join(bucket())
    assert b"[REDACTED:" in stored
    for secret in SECRETS:
        assert secret.encode() not in stored, f"{secret} reached the outputs or data_dir"
        assert secret.encode() not in (workdir / "agent.stderr").read_bytes()
