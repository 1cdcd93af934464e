"""The fluentd output's connection against both receivers (issue 13: 1, 4, 5's connection options).

The peer's ``flavor`` imitates Fluentd's or Fluent Bit's ``in_forward`` where their handshakes
differ (see tests/forward_peer.py); TLS peers count whether the agent ended with close_notify.
"""

from __future__ import annotations

import collections
import json
import socket
import ssl
import threading

import msgpack
import pytest
import trustme
from conftest import FAST_RETRIES, agent_config, seq_lines, wait_for

from shipper.config import load_text
from shipper.errors import ConfigError
from shipper.outputs.forward_tls import close_socket
from shipper.outputs.forward_protocol import AnswerReader, encode_entries, ping
from shipper.record import TIME, Batch, Envelope

FLAVORS = ["fluentd", "fluentbit"]


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    return json.dumps(value)


def output(*hosts, **options) -> str:
    """One [[outputs]] table; a host is a peer, or a table with "host" given as a peer."""
    items = [{**host, "host": host["host"].address} if isinstance(host, dict) else host.address for host in hosts]
    return "\n[[outputs]]\ntype = \"fluentd\"\n" + "".join(
        f"{key} = {toml(value)}\n" for key, value in {"hosts": items, **options}.items())


def start(run_agent, workdir, *outputs: str, shutdown_timeout: str = "10s"):
    config = agent_config(workdir / "logs", workdir / "data", output="".join(outputs), agent_extra=FAST_RETRIES)
    return run_agent(config.replace('shutdown_timeout = "10s"', f'shutdown_timeout = "{shutdown_timeout}"'))


def write(workdir, count: int) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.write(seq_lines(0, count))


def seq_counts(peer) -> collections.Counter:
    return collections.Counter(int(e.record["message"][4:11]) for e in peer.events())


def arrived(count: int, *peers) -> bool:
    return all(set(seq_counts(peer)) == set(range(count)) for peer in peers)


# ------------------------------------------------------------------ 1. the handshake with both receivers

@pytest.mark.parametrize("flavor", FLAVORS)
def test_shared_key_user_auth_and_tls_with_a_key_deliver(flavor, run_agent, workdir, make_forward_peer, forward_tls):
    server_context, ca = forward_tls
    key_peer = make_forward_peer(shared_key="k1", flavor=flavor)
    user_peer = make_forward_peer(shared_key="k2", users={"alice": "pw"}, flavor=flavor)
    tls_peer = make_forward_peer(tls=server_context, shared_key="k3", flavor=flavor)
    agent = start(run_agent, workdir, output(key_peer, shared_key="k1"),
                  output(user_peer, shared_key="k2", username="alice", password="pw"),
                  output(tls_peer, shared_key="k3", tls=True, tls_ca=str(ca)))
    write(workdir, 300)
    wait_for(lambda: arrived(300, key_peer, user_peer, tls_peer), message=f"every line at each {flavor} peer")
    assert agent.stop() == 0
    for peer in (key_peer, user_peer, tls_peer):
        assert max(seq_counts(peer).values()) == 1
        assert peer.handshakes and all(h.ok for h in peer.handshakes)
    assert {h.username for h in user_peer.handshakes} == {"alice"}
    assert "broke the forward protocol" not in agent.log()


@pytest.mark.parametrize("flavor, wrong_key", [
    ("fluentd", "the server refused the handshake: shared_key mismatch"),
    ("fluentbit", "the server closed the connection during the handshake (wrong shared_key?)"),
])
def test_a_wrong_key_or_password_is_a_clear_refusal(flavor, wrong_key, run_agent, workdir, make_forward_peer):
    key_peer = make_forward_peer(shared_key="right", flavor=flavor)
    user_peer = make_forward_peer(shared_key="right", users={"alice": "pw"}, flavor=flavor)
    agent = start(run_agent, workdir, output(key_peer, shared_key="wrong"),
                  output(user_peer, shared_key="right", username="alice", password="wrong"), shutdown_timeout="1s")
    write(workdir, 10)
    wrong_password = "the server refused the handshake: username/password mismatch"
    wait_for(lambda: wrong_key in agent.log() and wrong_password in agent.log(), message="both refusals logged")
    assert key_peer.events() == [] and user_peer.events() == []
    assert {h.reason for h in key_peer.handshakes} == {"shared_key mismatch"}
    assert {h.reason for h in user_peer.handshakes} == {"username/password mismatch"}
    assert "broke the forward protocol" not in agent.log() and "undecodable" not in agent.log()
    assert agent.stop(timeout=30) == 1  # undelivered: read again on the next start


def test_a_fluent_bit_helo_is_answered_with_str_fields_only():
    nonce, auth = bytes(range(0x80, 0x90)), b"\xff\x9f" * 8  # raw random bytes, not UTF-8
    helo, = AnswerReader().feed(msgpack.packb(["HELO", {"nonce": nonce, "auth": auth}], use_bin_type=False))
    message, salt, got_nonce = ping(helo, "client", "key", "alice", "pw")
    assert got_nonce == nonce
    assert all(isinstance(field, str) for field in message)
    assert len(message[2]) == 32 and int(message[2], 16) >= 0 and salt == message[2].encode()


def test_the_fluentbit_peer_refuses_a_bin_salt_and_a_wrong_key_without_a_pong(make_forward_peer):
    peer = make_forward_peer(shared_key="k", flavor="fluentbit")

    def answer_to(salt) -> bytes:
        with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as sock:
            helo = sock.recv(4096)
            _, options = msgpack.unpackb(helo, raw=True)
            # str (not bin) holding the random bytes, and no keepalive, as fw_prot.c packs it
            assert helo == msgpack.packb(["HELO", {"nonce": options[b"nonce"], "auth": options[b"auth"]}],
                                         use_bin_type=False)
            sock.sendall(msgpack.packb(["PING", "client", salt, "0" * 128, "", ""]))
            return sock.recv(4096)

    assert answer_to(b"salt as bin") == b""  # closed, no PONG
    assert answer_to("salt as str") == b""
    assert [h.reason for h in peer.handshakes] == ["Invalid shared_key_salt type message", "shared_key mismatch"]


# ------------------------------------------------------------------ 4. close_notify

def test_stopping_the_agent_ends_its_tls_connection_with_close_notify(run_agent, workdir, make_forward_peer,
                                                                      forward_tls):
    server_context, ca = forward_tls
    peer = make_forward_peer(tls=server_context)
    agent = start(run_agent, workdir, output(peer, tls=True, tls_ca=str(ca)))
    write(workdir, 100)
    wait_for(lambda: arrived(100, peer), message="lines over TLS")
    assert agent.stop() == 0
    peer.wait_for(lambda p: p.close_notifies + p.unclean_tls_closes, message="the agent's connection ended")
    assert (peer.close_notifies, peer.unclean_tls_closes, peer.connections) == (1, 0, 1)


def test_closing_does_not_wait_for_a_peer_that_never_answers_close_notify(forward_tls):
    server_context, ca = forward_tls
    listener = socket.create_server(("127.0.0.1", 0))
    received, release = [], threading.Event()

    def silent_server() -> None:
        raw, _ = listener.accept()
        with server_context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as sock:
            release.wait(30)  # reads nothing, answers nothing
            try:
                received.append(sock.recv(10))
            except ssl.SSLEOFError:
                received.append("closed without close_notify")

    thread = threading.Thread(target=silent_server)
    thread.start()
    client = ssl.create_default_context(cafile=str(ca))
    sock = client.wrap_socket(socket.create_connection(listener.getsockname(), timeout=5), server_hostname="127.0.0.1")
    close_socket(sock)  # returns at once although the server never answers
    release.set()
    thread.join(10)
    listener.close()
    assert received == [b""]  # what the server then reads: our close_notify


# ------------------------------------------------------------------ 5. connection options

def problems(outputs: str, tmp_path) -> list[str]:
    try:
        load_text(agent_config(tmp_path / "logs", tmp_path / "data", output=outputs), "test.toml")
    except ConfigError as exc:
        return exc.problems
    return []


def test_check_names_the_wrong_key_of_a_host_table_and_of_the_tls_files(tmp_path):
    found = problems('\n[[outputs]]\ntype = "fluentd"\nhosts = ["a:1", {host = "b:2", shared_key = 3, '
                     'wieght = 2}, {username = "u"}]\ntls_key = "/k.pem"\ntls_server_name = "x"\n', tmp_path)
    unknown = [p for p in found if p == "outputs[0].hosts[1].wieght: unknown key; did you mean weight?"]
    assert len(unknown) == 1
    assert set(found) - set(unknown) == {
        "outputs[0].hosts[1].shared_key: expected a string, got int", "outputs[0].hosts[2].host: required",
        "outputs[0].tls_key: only used with tls = true", "outputs[0].tls_server_name: only used with tls = true",
        "outputs[0].tls_key: the key of a client certificate: set tls_cert too"}
    assert problems('\n[[outputs]]\ntype = "fluentd"\nhosts = [{host = "b:2", username = "u"}]\n', tmp_path) == [
        "outputs[0].hosts[0].username: the user login is part of the shared_key handshake; set shared_key too"]
    assert problems(f'\n[[outputs]]\ntype = "fluentd"\nhosts = ["a"]\ntls = true\n'
                    f'tls_cert = "{tmp_path}/missing.pem"\n', tmp_path) == [
        f"outputs[0].tls_cert: cannot read '{tmp_path}/missing.pem'"]


def test_each_host_uses_its_own_credentials(run_agent, workdir, make_forward_peer):
    first = make_forward_peer(shared_key="a")
    second = make_forward_peer(shared_key="b", users={"bob": "pw"})
    # The output's key is right for the first host, but the first host's own (wrong) key is the one used.
    agent = start(run_agent, workdir, output({"host": first, "shared_key": "nope"},
                                             {"host": second, "shared_key": "b", "username": "bob", "password": "pw"},
                                             shared_key="a"))
    write(workdir, 200)
    wait_for(lambda: arrived(200, second), message="every line on the second host")
    assert agent.stop() == 0
    assert first.events() == [] and {h.reason for h in first.handshakes} == {"shared_key mismatch"}
    assert {(h.username, h.ok) for h in second.handshakes} == {("bob", True)}


def test_mutual_tls_with_a_client_certificate(run_agent, workdir, make_forward_peer, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED  # no certificate from the client, no connection
    ca.configure_trust(server_context)
    client = ca.issue_cert("agent.example")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client.private_key_pem.write_to_path(str(paths["key"]))
    peer = make_forward_peer(tls=server_context)
    agent = start(run_agent, workdir, output(peer, tls=True, tls_ca=str(paths["ca"]), tls_cert=str(paths["cert"]),
                                             tls_key=str(paths["key"])))
    write(workdir, 100)
    wait_for(lambda: arrived(100, peer), message="lines over mutual TLS")
    assert agent.stop() == 0
    assert {c.client_cert for c in peer.tls_clients()} == {"agent.example"}


def test_tls_server_name_and_tls_verify_hostname(run_agent, workdir, make_forward_peer, tmp_path):
    """The certificate names logs.example only, the address is 127.0.0.1."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("logs.example").configure_cert(server_context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    named, per_host, unchecked, default = (make_forward_peer(tls=server_context) for _ in range(4))
    tls = {"tls": True, "tls_ca": str(ca_path)}
    agent = start(run_agent, workdir, output(named, tls_server_name="logs.example", **tls),
                  output({"host": per_host, "tls_server_name": "logs.example"}, **tls),
                  output(unchecked, tls_verify_hostname=False, **tls),
                  output(default, **tls), shutdown_timeout="1s")
    write(workdir, 100)
    wait_for(lambda: arrived(100, named, per_host, unchecked), message="lines where the name is right or unchecked")
    wait_for(lambda: "certificate is not valid for '127.0.0.1'" in agent.log(),
             message="the default: the certificate must name the address")
    assert agent.stop(timeout=30) == 1
    assert default.events() == []
    assert {c.server_name for c in named.tls_clients() + per_host.tls_clients()} == {"logs.example"}
    assert {c.server_name for c in unchecked.tls_clients()} == {None}  # no SNI for an address


def test_time_as_integer_sends_integer_seconds(run_agent, workdir, forward_peer):
    agent = start(run_agent, workdir, output(forward_peer, time_as_integer=True))
    write(workdir, 100)
    wait_for(lambda: arrived(100, forward_peer), message="lines")
    assert agent.stop() == 0
    assert {e.nanos for e in forward_peer.events()} == {None}  # the peer decoded an integer, not an EventTime
    parsed = Batch("app", None, 1000.5, messages=["a", "b"], fields=[{TIME: "2026-11-29T13:17:18.250000Z"}, {}])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(encode_entries(parsed, Envelope(), time_as_integer=True))
    assert [when for when, _ in unpacker] == [1795958238, 1000]
