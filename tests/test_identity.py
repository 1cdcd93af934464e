import socket
import time

from conftest import agent_config, read_archive, wait_for
from imds import TOKEN, FakeImds
from shipper.identity import ImdsClient, looks_like_ec2, resolve_identity


def test_imdsv2_identity_uses_a_token_and_caches_it():
    with FakeImds() as imds:
        identity = resolve_identity("ec2", imds.endpoint, 1.0)
    assert identity == {"host": socket.gethostname(), "instance_id": "i-0abc1234def567890",
                        "image_id": "ami-0def1234abc567890", "region": "eu-west-1",
                        "availability_zone": "eu-west-1b", "instance_type": "t3.micro"}
    puts = [r for r in imds.requests if r[0] == "PUT"]
    assert len(puts) == 1 and puts[0][2] == "21600"
    assert all(r[2] == TOKEN for r in imds.requests if r[0] == "GET")


def test_the_auto_scaling_group_comes_from_instance_tags_when_allowed():
    with FakeImds({"meta-data/instance-id": "i-1",
                   "meta-data/tags/instance/aws:autoscaling:groupName": "web-asg"}) as imds:
        identity = resolve_identity("ec2", imds.endpoint, 1.0)
    assert identity["autoscaling_group"] == "web-asg"


def test_missing_values_are_left_out():
    with FakeImds({"meta-data/instance-id": "i-1"}) as imds:
        assert resolve_identity("ec2", imds.endpoint, 1.0) == {"host": socket.gethostname(), "instance_id": "i-1"}


def test_unreachable_imds_gives_up_quickly_with_the_host_name_only():
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        started = time.monotonic()
        identity = resolve_identity("ec2", f"http://127.0.0.1:{blackhole.getsockname()[1]}", 0.3)
        assert time.monotonic() - started < 3
    assert identity == {"host": socket.gethostname()}


def test_auto_asks_imds_only_on_ec2(tmp_path):
    with FakeImds() as imds:
        identity = resolve_identity("auto", imds.endpoint, 1.0)
        assert imds.requests == [] if not looks_like_ec2() else len(identity) > 1
    vendor = tmp_path / "sys_vendor"
    vendor.write_text("Amazon EC2\n")
    assert looks_like_ec2([(str(vendor), "Amazon EC2")])
    vendor.write_text("QEMU\n")
    assert not looks_like_ec2([(str(vendor), "Amazon EC2")])


def test_expired_token_is_renewed():
    with FakeImds() as imds:
        client = ImdsClient(imds.endpoint, 1.0)
        client._token = "stale"
        client._token_expires = time.monotonic() + 100
        assert client.get("meta-data/instance-id") == "i-0abc1234def567890"


def test_records_and_keys_carry_the_instance_identity(workdir, run_agent):
    with FakeImds() as imds:
        config = agent_config(workdir / "logs", workdir / "data").replace(
            'metadata = "off"', f'metadata = "ec2"\nimds_endpoint = "{imds.endpoint}"')
        (workdir / "logs" / "app.log").write_text("hello\n")
        agent = run_agent(config)
        wait_for(lambda: read_archive(workdir / "data" / "archive"), message="the record")
        assert agent.stop() == 0
    record = read_archive(workdir / "data" / "archive")[0]
    assert record["instance_id"] == "i-0abc1234def567890" and record["image_id"] == "ami-0def1234abc567890"
    assert record["region"] == "eu-west-1"
    assert list(record)[:4] == ["time", "tag", "host", "instance_id"]
    objects = list((workdir / "data" / "archive").rglob("*.ndjson.gz"))
    assert objects[0].parent.parent.name == "instance=i-0abc1234def567890"
