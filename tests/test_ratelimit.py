"""Rate limits per org against real Redis servers: a token bucket in one round trip.

The strategy's own contract (limits' strategy tests, every storage) is in
``test_ratelimit_contract.py``; the async checks are in ``test_ratelimit_async.py``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from limits.storage import storage_from_string
from redis.cluster import RedisCluster
from redis_cluster import (
    RedisServer,
    command_calls,
    free_port,
    redis_cluster,
    redis_sentinel,
)

from tenantdb.errors import ConfigurationError, MissingOrgError
from tenantdb.pytest_plugin import TestRedis
from tenantdb.ratelimit import (
    BucketSpec,
    RateLimitReason,
    RateLimitResult,
    TokenBucketRateLimiter,
    check_rate_limit,
    reset_rate_limit,
)
from tenantdb.settings import get_settings, override_settings

# Five tokens refilled over five seconds: one a second keeps refill tests fast.
FAST = BucketSpec("fast", limit=5, period_s=5)
TIMEOUT_S = 0.2
SLACK_S = 0.05


# Every check here is in this org; twin-org tests make a second one.
ORG = str(uuid.uuid4())




@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """A 3-master cluster on loopback ports for this module (~4 s to form)."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
def cluster_url(cluster_nodes: list[RedisServer]) -> Iterator[str]:
    """The cluster's URL, in Settings with a fresh key prefix."""
    url = f"redis+cluster://127.0.0.1:{cluster_nodes[0].port}"
    with override_settings(redis_url=url, redis_key_prefix=f"cl-{uuid.uuid4().hex[:8]}"):
        yield url


def _burst(user_id: str, bucket: str | BucketSpec, count: int) -> list[RateLimitResult]:
    return [check_rate_limit(user_id, bucket, org_id=ORG) for _ in range(count)]


def _race(user_id: str, bucket: str, threads: int) -> list[RateLimitResult]:
    barrier = threading.Barrier(threads)
    results: list[RateLimitResult] = []

    def check() -> None:
        barrier.wait()
        results.append(check_rate_limit(user_id, bucket, org_id=ORG))

    workers = [threading.Thread(target=check) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def _key(user_id: str, org_id: str = ORG, tail: str = "agent/5/1/minute") -> str:
    return f"{get_settings().redis_key_prefix}:rl:token-bucket/{{{org_id}:{user_id}}}/{tail}"


def _cluster_client(url: str) -> RedisCluster:
    return RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))


def _pttl(client: redis.Redis, key: str) -> int:
    return int(client.pttl(key))  # type: ignore[arg-type]


# SEMANTICS


@pytest.mark.usefixtures("tenantdb_redis")
def test_agent_burst_counts_down_then_denies_with_retry_after(user: str) -> None:
    results = _burst(user, "agent", 6)
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    assert [r.reset_after_seconds for r in results[:5]] == [12, 24, 36, 48, 60]
    denied = results[5]
    assert denied.retry_after_seconds is not None
    assert 0 < denied.retry_after_seconds <= 12
    assert (denied.remaining, denied.limit, denied.window_seconds) == (0, 5, 60)
    assert (denied.policy, denied.reason, denied.degraded) == (
        "agent", RateLimitReason.OVER_LIMIT, False)
    assert results[0].reason == RateLimitReason.WITHIN_LIMIT


@pytest.mark.usefixtures("tenantdb_redis")
def test_agent_limit_follows_settings(user: str) -> None:
    with override_settings(rate_limit_agent_per_minute=2):
        assert [r.allowed for r in _burst(user, "agent", 3)] == [True, True, False]


@pytest.mark.usefixtures("tenantdb_redis")
def test_crud_allows_sixty_then_denies(user: str) -> None:
    results = _burst(user, "crud", 61)
    assert all(r.allowed for r in results[:60])
    assert not results[60].allowed
    assert results[60].retry_after_seconds == 1


@pytest.mark.usefixtures("tenantdb_redis")
def test_refill_allows_again_after_retry_after(user: str) -> None:
    denied = _burst(user, FAST, 6)[-1]
    assert not denied.allowed
    assert denied.retry_after_seconds == 1
    time.sleep(denied.retry_after_seconds)
    assert check_rate_limit(user, FAST, org_id=ORG).allowed


@pytest.mark.usefixtures("tenantdb_redis")
def test_denied_checks_consume_nothing(user: str) -> None:
    assert all(r.allowed for r in _burst(user, "agent", 5))
    hammered = _burst(user, "agent", 50)
    assert not any(r.allowed for r in hammered)
    # Had a refusal taken a token, the wait and the time to full would have grown.
    retry = [r.retry_after_seconds or 0 for r in hammered]
    assert retry == sorted(retry, reverse=True)
    assert 0 < retry[-1] <= 12
    assert all((r.reset_after_seconds or 0) <= 60 for r in hammered)


@pytest.mark.usefixtures("tenantdb_redis")
def test_users_and_buckets_are_independent(user: str) -> None:
    _burst(user, "agent", 5)
    assert not check_rate_limit(user, "agent", org_id=ORG).allowed
    assert check_rate_limit(user, "crud", org_id=ORG).remaining == 59
    assert check_rate_limit(str(uuid.uuid4()), "agent", org_id=ORG).remaining == 4


@pytest.mark.usefixtures("tenantdb_redis")
def test_limit_per_minute_overrides_bucket_limit(user: str) -> None:
    results = [check_rate_limit(user, "agent", limit_per_minute=2, org_id=ORG) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    assert results[2].retry_after_seconds == 30


@pytest.mark.usefixtures("tenantdb_redis")
def test_concurrent_checks_allow_exactly_the_limit(user: str) -> None:
    # Build the cached client before the race.
    check_rate_limit(str(uuid.uuid4()), "agent", org_id=ORG)
    results = _race(user, "agent", 20)
    assert sum(r.allowed for r in results) == 5
    assert sorted(r.remaining or 0 for r in results if r.allowed) == [0, 1, 2, 3, 4]


@pytest.mark.usefixtures("tenantdb_redis")
def test_client_clock_shift_changes_no_decision(
    user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _burst(user, "agent", 5)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 30)
    # 30 s on the application's clock would refill 2.5 tokens; Redis's clock did not move.
    denied = check_rate_limit(user, "agent", org_id=ORG)
    assert not denied.allowed
    assert denied.retry_after_seconds is not None
    assert denied.retry_after_seconds <= 12


def test_check_sends_exactly_one_redis_command(tenantdb_redis: TestRedis, user: str) -> None:
    check_rate_limit(user, "crud", org_id=ORG)  # first use may connect and load the script
    before = command_calls(tenantdb_redis.client)
    for _ in range(10):
        check_rate_limit(user, "crud", org_id=ORG)
    after = command_calls(tenantdb_redis.client)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    # commandstats also counts the calls a script makes: TIME, GET and SET are the
    # script's own; anything else (a PING, a second GET) would be an extra round trip.
    script = {"cmdstat_time": 10, "cmdstat_get": 10, "cmdstat_set": 10}
    assert {name: n for name, n in delta.items() if n} == {"cmdstat_evalsha": 10, **script}


def test_script_reloads_after_script_flush(tenantdb_redis: TestRedis, user: str) -> None:
    check_rate_limit(user, "agent", org_id=ORG)
    tenantdb_redis.client.script_flush()
    result = check_rate_limit(user, "agent", org_id=ORG)
    assert (result.allowed, result.remaining, result.degraded) == (True, 3, False)


def test_key_names_org_and_limit_with_ttl_of_one_refill(
    tenantdb_redis: TestRedis, user: str
) -> None:
    check_rate_limit(user, "agent", org_id=ORG)
    key = f"{tenantdb_redis.prefix}:rl:token-bucket/{{{ORG}:{user}}}/agent/5/1/minute"
    assert _key(user) == key
    assert tenantdb_redis.client.exists(key)
    # One token spent refills in 12 s; a full refill is 60 s.
    assert 11_000 < _pttl(tenantdb_redis.client, key) <= 12_000
    _burst(user, "agent", 5)
    assert _pttl(tenantdb_redis.client, key) <= 60_000


def test_reset_rate_limit_refills_bucket(tenantdb_redis: TestRedis, user: str) -> None:
    _burst(user, "agent", 5)
    assert reset_rate_limit(user, "agent", org_id=ORG) is True
    assert check_rate_limit(user, "agent", org_id=ORG).remaining == 4


@pytest.mark.usefixtures("tenantdb_redis")
def test_moving_window_bucket_uses_limits_strategy(user: str) -> None:
    spec = BucketSpec("window", limit=3, strategy="moving-window")
    results = _burst(user, spec, 4)
    assert [r.remaining for r in results[:3]] == [2, 1, 0]
    assert not results[3].allowed
    assert results[3].retry_after_seconds is not None
    assert 0 < results[3].retry_after_seconds <= 60


@pytest.mark.usefixtures("tenantdb_redis")
def test_switching_strategy_keeps_keys_apart(user: str) -> None:
    # limits' fixed and moving windows share key names; a live switch would hit WRONGTYPE.
    for strategy in ("fixed-window", "moving-window", "sliding-window-counter", "token-bucket"):
        spec = BucketSpec("switch", limit=3, strategy=strategy)
        result = check_rate_limit(user, spec, org_id=ORG)
        assert (result.allowed, result.remaining, result.degraded) == (True, 2, False)


# ORGS, ITEMS AND IDS


@pytest.mark.usefixtures("tenantdb_redis")
def test_twin_orgs_same_user_id_have_independent_buckets(user: str) -> None:
    twin = str(uuid.uuid4())
    assert [r.allowed for r in _burst(user, "agent", 6)] == [True] * 5 + [False]
    assert check_rate_limit(user, "agent", org_id=twin).remaining == 4
    assert reset_rate_limit(user, "agent", org_id=twin) is True
    assert not check_rate_limit(user, "agent", org_id=ORG).allowed  # the twin's reset only


def test_two_orgs_keys_name_their_org(tenantdb_redis: TestRedis, user: str) -> None:
    twin = str(uuid.uuid4())
    check_rate_limit(user, "agent", org_id=ORG)
    check_rate_limit(uuid.UUID(user), "agent", org_id=uuid.UUID(twin))
    keys = {k.decode() for k in tenantdb_redis.client.keys(f"{tenantdb_redis.prefix}:*")}
    assert keys == {_key(user), _key(user, twin)}


@pytest.mark.usefixtures("tenantdb_redis")
def test_two_limit_items_never_share_a_bucket(user: str) -> None:
    per_minute = BucketSpec("api", limit=5, period_s=60)
    per_second = BucketSpec("api", limit=10, period_s=1)
    assert [r.allowed for r in _burst(user, per_minute, 6)] == [True] * 5 + [False]
    assert check_rate_limit(user, per_second, org_id=ORG).remaining == 9
    assert reset_rate_limit(user, per_second, org_id=ORG) is True
    assert not check_rate_limit(user, per_minute, org_id=ORG).allowed


@pytest.mark.usefixtures("tenantdb_redis")
def test_reset_of_an_overridden_limit_names_the_override(user: str) -> None:
    _burst(user, "agent", 5)
    assert not check_rate_limit(user, "agent", limit_per_minute=1, org_id=ORG).remaining
    assert reset_rate_limit(user, "agent", limit_per_minute=1, org_id=ORG)
    assert check_rate_limit(user, "agent", limit_per_minute=1, org_id=ORG).allowed
    assert not check_rate_limit(user, "agent", org_id=ORG).allowed  # its own bucket kept


@pytest.mark.usefixtures("tenantdb_redis")
def test_every_spelling_of_a_user_id_is_one_bucket(user: str) -> None:
    spellings = [user, user.upper(), f"{{{user}}}", user.replace("-", ""), uuid.UUID(user)]
    results = [check_rate_limit(s, "agent", org_id=ORG) for s in spellings]
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0]


BAD_USER_IDS = [None, b"u", uuid.uuid4().bytes, 5, True, 1.5, "", "u",
                "not-a-uuid", "a{b", f"{uuid.uuid4()}}}x", ["x"]]
BAD_ORG_IDS = [None, "", 0, 5, b"org", "org-1", str(uuid.uuid4())[:-1]]


@pytest.mark.parametrize("user_id", BAD_USER_IDS)
def test_bad_user_id_is_refused_before_any_redis_command(
    tenantdb_redis: TestRedis, user_id: object
) -> None:
    before = command_calls(tenantdb_redis.client)
    with pytest.raises(ValueError, match="user_id must be a UUID"):
        check_rate_limit(user_id, "agent", org_id=ORG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user_id must be a UUID"):
        reset_rate_limit(user_id, "agent", org_id=ORG)  # type: ignore[arg-type]
    assert command_calls(tenantdb_redis.client) == before


@pytest.mark.parametrize("org_id", BAD_ORG_IDS)
def test_missing_or_bad_org_is_refused_before_any_redis_command(
    tenantdb_redis: TestRedis, user: str, org_id: object
) -> None:
    before = command_calls(tenantdb_redis.client)
    with pytest.raises(MissingOrgError, match=r"check_rate_limit\(\)"):
        check_rate_limit(user, "agent", org_id=org_id)  # type: ignore[arg-type]
    with pytest.raises(MissingOrgError, match=r"reset_rate_limit\(\)"):
        reset_rate_limit(user, "agent", org_id=org_id)  # type: ignore[arg-type]
    assert command_calls(tenantdb_redis.client) == before


def test_ids_checked_before_vouch_for_no_other_split(
    tenantdb_redis: TestRedis, user: str
) -> None:
    # A valid pair is remembered after its first check; its pieces recombined (the
    # colon moved into the org or the user) are still refused, before any command.
    check_rate_limit(user, "agent", org_id=ORG)
    before = command_calls(tenantdb_redis.client)
    for org_id, user_id in [(f"{ORG}:{user[:8]}", user[9:]), (ORG[:-1], f"{ORG[-1]}:{user}"),
                            (f"{ORG}:", user), (ORG, f":{user}")]:
        with pytest.raises((ValueError, MissingOrgError)):
            check_rate_limit(user_id, "agent", org_id=org_id)
    assert command_calls(tenantdb_redis.client) == before


def test_org_id_is_a_required_keyword() -> None:
    with pytest.raises(TypeError, match="org_id"):
        check_rate_limit(str(uuid.uuid4()), "agent")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        check_rate_limit(str(uuid.uuid4()), "agent", None, ORG)  # type: ignore[misc]


# ARGUMENT CHECKS (before any Redis call: no URL is configured here)


@pytest.mark.parametrize(
    ("bucket", "limit"),
    [("nope", None), ("agent", 0), ("agent", -5), ("", None), ("agent", 2.5), ("agent", "5"),
     ("agent", True)],
)
def test_bad_bucket_or_limit_raises_value_error(bucket: str, limit: int | None) -> None:
    with override_settings(redis_url=None), pytest.raises(ValueError, match=r"bucket|limit"):
        check_rate_limit(str(uuid.uuid4()), bucket, limit_per_minute=limit, org_id=ORG)


def test_missing_redis_url_raises_configuration_error() -> None:
    with override_settings(redis_url=None), pytest.raises(ConfigurationError, match="REDIS_URL"):
        check_rate_limit(str(uuid.uuid4()), "agent", org_id=ORG)


def test_unknown_strategy_raises_value_error() -> None:
    with pytest.raises(ValueError, match="strategy"):
        BucketSpec("x", 1, strategy="leaky")


def test_bucket_too_fine_to_refill_exactly_raises_value_error() -> None:
    with pytest.raises(ValueError, match="exactly"):
        BucketSpec("x", 9_999_991, period_s=86_400)


def test_token_bucket_on_memory_storage_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Redis storage"):
        TokenBucketRateLimiter(storage_from_string("memory://"))


# FAILURE MODES


def _degraded(*, allowed: bool, limit: int, policy: str) -> RateLimitResult:
    # A degraded result: the bucket's failure mode, no counts, marked as an outage.
    return RateLimitResult(
        allowed=allowed, limit=limit, window_seconds=60, policy=policy, remaining=None,
        reset_after_seconds=None, retry_after_seconds=None,
        reason=RateLimitReason.REDIS_UNAVAILABLE,
    )


def _timed_check(user_id: str, bucket: str) -> tuple[RateLimitResult, float]:
    started = time.monotonic()
    result = check_rate_limit(user_id, bucket, org_id=ORG)
    return result, time.monotonic() - started


def test_killed_redis_fails_in_bucket_mode_then_recovers(
    dedicated_redis: RedisServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert not check_rate_limit(user, "agent", org_id=ORG).degraded
    dedicated_redis.stop()
    with caplog.at_level(logging.DEBUG, logger="tenantdb.ratelimit"):
        agent, agent_s = _timed_check(user, "agent")
        crud, crud_s = _timed_check(user, "crud")
    assert agent == _degraded(allowed=False, limit=5, policy="agent")
    assert crud == _degraded(allowed=True, limit=60, policy="crud")
    assert agent.degraded and crud.degraded
    assert max(agent_s, crud_s) <= TIMEOUT_S + SLACK_S
    levels = [r.levelno for r in caplog.records if r.name == "tenantdb.ratelimit"]
    assert levels == [logging.WARNING, logging.DEBUG]
    dedicated_redis.start()
    recovered = check_rate_limit(user, "agent", org_id=ORG)
    assert (recovered.allowed, recovered.remaining, recovered.degraded) == (True, 4, False)


def test_hung_redis_returns_within_timeout_then_recovers(
    dedicated_redis: RedisServer, user: str
) -> None:
    assert not check_rate_limit(user, "crud", org_id=ORG).degraded
    dedicated_redis.pause()
    try:
        agent, agent_s = _timed_check(user, "agent")
        crud, crud_s = _timed_check(user, "crud")
    finally:
        dedicated_redis.resume()
    assert (agent.allowed, agent.degraded, crud.allowed, crud.degraded) == (False, True, True, True)
    assert max(agent_s, crud_s) <= TIMEOUT_S + SLACK_S
    recovered = check_rate_limit(user, "crud", org_id=ORG)
    assert recovered.degraded is False
    assert recovered.allowed


def test_unreachable_cluster_fails_in_bucket_mode(user: str) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with override_settings(redis_url=url, redis_socket_timeout_s=TIMEOUT_S):
        result, elapsed = _timed_check(user, "agent")
    assert (result.allowed, result.degraded) == (False, True)
    assert elapsed <= TIMEOUT_S + SLACK_S


# CLUSTER AND SENTINEL


def test_cluster_burst_and_independence(cluster_url: str) -> None:
    users = [str(uuid.uuid4()) for _ in range(6)]
    for user_id in users:
        results = _burst(user_id, "agent", 6)
        assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
        assert [r.allowed for r in results] == [True] * 5 + [False]
    # The keys exist under their hash tags, spread over more than one master.
    keys = [_key(u) for u in users]
    with _cluster_client(cluster_url) as cluster:
        assert all(cluster.exists(key) for key in keys)
        assert len({cluster.get_node_from_key(key).name for key in keys}) > 1


def test_cluster_concurrent_checks_allow_exactly_the_limit(cluster_url: str, user: str) -> None:
    check_rate_limit(str(uuid.uuid4()), "agent", org_id=ORG)
    assert sum(r.allowed for r in _race(user, "agent", 20)) == 5


@pytest.mark.usefixtures("cluster_url")
@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter", "fixed-window"])
def test_cluster_runs_limits_strategies(strategy: str, user: str) -> None:
    spec = BucketSpec("w", limit=2, strategy=strategy)
    assert [r.allowed for r in _burst(user, spec, 3)] == [True, True, False]


def test_cluster_hung_master_degrades_only_its_users(
    cluster_nodes: list[RedisServer], cluster_url: str
) -> None:
    users = [str(uuid.uuid4()) for _ in range(12)]
    with _cluster_client(cluster_url) as cluster:
        ports = {u: cluster.get_node_from_key(_key(u)).port for u in users}
    victim = cluster_nodes[1]
    on_victim = [u for u in users if ports[u] == victim.port]
    elsewhere = [u for u in users if ports[u] != victim.port]
    assert on_victim and elsewhere
    with override_settings(redis_socket_timeout_s=TIMEOUT_S):
        for u in users:
            check_rate_limit(u, "agent", org_id=ORG)
        victim.pause()
        try:
            hung, hung_s = _timed_check(on_victim[0], "agent")
            fine = check_rate_limit(elsewhere[0], "agent", org_id=ORG)
        finally:
            victim.resume()
        recovered = check_rate_limit(on_victim[0], "agent", org_id=ORG)
    assert (hung.allowed, hung.degraded, fine.remaining, fine.degraded) == (False, True, 3, False)
    assert hung_s <= TIMEOUT_S + SLACK_S
    assert (recovered.degraded, recovered.allowed) == (False, True)


def test_sentinel_burst_then_denies(tmp_path: Path, user: str) -> None:
    with redis_sentinel(tmp_path) as (_master, url), override_settings(redis_url=url):
        results = _burst(user, "agent", 6)
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert get_settings().redis_url != url
