"""The replay mirror and `asyncrl replay` over rediss:// URLs: TLS settings and AUTH from the URL.

The redis-server here is built without TLS, so TLS ends at a `TlsTerminator` in front of its plain
port (replay_fixtures.py): these tests cover redis-py's side of TLS as asyncrl configures it, not
Redis's native TLS. Reads through the plain port show that what went in over TLS arrived.
"""

import logging

import numpy as np
from click.testing import CliRunner

from asyncrl.replay.cli import replay
from asyncrl.replay.mirror import ReplayMirror
from asyncrl.replay.store import ReplayStore, redact
from replay_fixtures import (  # noqa: F401  (fixtures)
    Run,
    char_group,
    entry_of,
    mutual_tls_redis,
    redis_server,
    redis_server_with_password,
    tls_files,
    tls_redis,
    tls_redis_with_password,
)


def mirror_groups(url: str, n: int = 3):
    """Mirrors n groups as run r1 and closes the mirror; returns (groups, the mirror's stats)."""
    mirror = ReplayMirror(url, "r1")
    groups = [char_group(version=i) for i in range(n)]
    for group in groups:
        mirror.on_accept(entry_of(group))
    return groups, mirror.close(timeout_s=10)


def test_mirror_writes_through_a_rediss_url_naming_the_ca(redis_server, tls_redis, tls_files):
    url = tls_redis.url(ssl_cert_reqs="required", ssl_ca_certs=str(tls_files.ca))
    groups, stats = mirror_groups(url)
    assert (stats["written"], stats["lost"]) == (3, 0) and tls_redis.connections >= 1
    plain = ReplayStore.open(redis_server.url)
    assert plain.group_ids("r1") == [g.group_id for g in groups]
    back, _, _ = plain.load_group("r1", groups[1].group_id)
    assert np.array_equal(back.samples[0].tokens, groups[1].samples[0].tokens)


def test_replay_runs_ls_and_show_work_over_tls(tls_redis, tls_files):
    run = Run(tls_redis.url(ssl_ca_certs=str(tls_files.ca)))
    try:
        assert "r1" in run.cli("runs").output
        assert run.ids("--min-version", "3") == [g.group_id for g in run.groups[6:]]
        shown = run.cli("show", run.groups[1].group_id[:10])
        assert shown.exit_code == 0 and "prompt: '123='" in shown.output and "response: '123'" in shown.output
    finally:
        run.mirror.close()
    assert tls_redis.connections >= 4  # the mirror's and one per CLI command


def test_mirror_counts_records_lost_to_an_unverified_certificate(redis_server, tls_redis, caplog):
    caplog.set_level(logging.WARNING, logger="asyncrl.replay")
    _, stats = mirror_groups(tls_redis.url())  # no ssl_ca_certs: the system CAs do not know the test CA
    assert (stats["written"], stats["lost_redis"]) == (0, 3)
    assert "CERTIFICATE_VERIFY_FAILED" in stats["last_error"]
    assert "ssl_ca_certs=/path/ca.pem" in caplog.text
    assert redis_server.client().keys("*") == []


def test_cli_without_the_ca_is_an_error_naming_the_url_without_its_password(tls_redis_with_password):
    url = tls_redis_with_password.url(password="s3cret")
    result = CliRunner().invoke(replay, ["--url", url, "runs"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    assert f"cannot reach Redis at rediss://:***@127.0.0.1:{tls_redis_with_password.port}/0" in result.output
    assert "certificate verify failed" in result.output and "ssl_ca_certs=/path/ca.pem" in result.output
    assert "s3cret" not in result.output


def test_password_and_tls_together(redis_server_with_password, tls_redis_with_password, tls_files):
    url = tls_redis_with_password.url(password="s3cret", ssl_ca_certs=str(tls_files.ca))
    groups, stats = mirror_groups(url)
    assert (stats["written"], stats["lost"]) == (3, 0)
    assert ReplayStore.open(redis_server_with_password.url).group_ids("r1") == [g.group_id for g in groups]
    assert '"groups": 3' in CliRunner().invoke(replay, ["--url", url, "runs", "--json"]).output
    wrong = CliRunner().invoke(replay, ["--url", url.replace("s3cret", "wrong"), "runs"])
    assert wrong.exit_code == 1 and "refused the credentials" in wrong.output and "wrong" not in wrong.output


def test_mutual_tls_takes_the_client_certificate_from_the_url(redis_server, mutual_tls_redis, tls_files):
    url = mutual_tls_redis.url(ssl_ca_certs=str(tls_files.ca), ssl_certfile=str(tls_files.client_cert),
                               ssl_keyfile=str(tls_files.client_key))
    groups, stats = mirror_groups(url, n=1)
    assert stats["written"] == 1
    assert ReplayStore.open(redis_server.url).group_ids("r1") == [groups[0].group_id]


def test_mutual_tls_without_a_client_certificate_says_where_it_goes(mutual_tls_redis, tls_files):
    url = mutual_tls_redis.url(ssl_ca_certs=str(tls_files.ca))
    result = CliRunner().invoke(replay, ["--url", url, "runs"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem" in result.output


def test_redact_hides_the_password_and_a_tls_key_password():
    url = "rediss://u:pw@h:6380/0?ssl_keyfile=/k.pem&ssl_password=kpw&ssl_ca_certs=/ca.pem"
    assert redact(url) == "rediss://u:***@h:6380/0?ssl_keyfile=/k.pem&ssl_password=***&ssl_ca_certs=/ca.pem"
