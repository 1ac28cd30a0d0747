"""The admin API (issue 18, item 2): /admin/status and /admin/dead-letters on the ingress listener.

End to end: a real relay on the embedded Redis, the fake IOP refusing the Location names a test lists (OCPI
2001, permanent: a dead letter), and the admin routes called over HTTP as a back office calls them; the CLI
run beside them where the API promises the CLI's answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from relay.cli import main
from relay.config import load
from relay.errors import ConfigError
from relay.ingress.admin import ADMIN_OPERATIONS, MAX_BODY_BYTES, MAX_IDS, AdminOperation
from relay.ordering import location_key, shard_of
from relay.service import Relay
from relay.store import DeliveryStore
from tests.conftest import REPO, TOKEN
from tests.fake_iop import FakeIop, Received, Reply
from tests.test_dlq import FAST, Env
from tests.waiting import wait_until

ADMIN = "test-admin-token-0123456789abcdef"
ROUTES = ["/admin/status", "/admin/dead-letters", "/admin/dead-letters/1-0"]


class Admin(Env):
    """The relay, the fake IOP, and an admin client."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.relay.ingress_port}"

    async def call(self, method: str, path: str, *, token: str | None = ADMIN, params: Any = None,
                   body: Any = None, raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.base + path, params=params, data=data, headers=headers) as r,
        ):
            text = await r.text()
            assert r.status != 500, text
            assert r.content_type == "application/json", (r.status, text)
            return r.status, json.loads(text), dict(r.headers)

    async def get(self, path: str, **kw: Any) -> Any:
        status, data, _ = await self.call("GET", path, **kw)
        assert status == 200, data
        return data

    async def post(self, path: str, body: Any) -> Any:
        status, data, _ = await self.call("POST", path, body=body)
        assert status == 200, data
        return data

    async def dead(self, n: int, **params: str) -> list[dict[str, Any]]:
        """The dead letters listed (waiting until there are ``n``)."""
        rows: list[dict[str, Any]] = []

        async def listed() -> bool:
            nonlocal rows
            rows = (await self.get("/admin/dead-letters", params=params))["items"]
            return len(rows) == n

        await wait_until(listed, 20, lambda: f"{n} dead letters listed (have {len(rows)})")
        return rows


def problem(answer: tuple[int, Any, dict[str, str]], status: int, field: str | None = None) -> str:
    """Assert an AdminError with this status (and first field); returns its message."""
    got, data, _ = answer
    assert got == status, data
    assert data["status"] == status and data["errors"], data
    if field is not None:
        assert data["errors"][0]["field"] == field, data
    return str(data["message"])


@pytest.fixture
async def admin(make_settings: Callable[..., Any], request: pytest.FixtureRequest) -> AsyncIterator[Admin]:
    iop = FakeIop()
    await iop.start()
    extra: dict[str, str] = getattr(request, "param", {})
    env = {"RELAY_ADMIN_TOKEN": ADMIN, **extra}
    settings = make_settings(RELAY_IOP_URL=iop.url, RELAY_IOP_TOKEN="t", **FAST, **env)
    relay = Relay(settings)
    a = Admin(relay, iop, settings)

    def script(r: Received) -> Reply | None:
        body = r.json()
        if body["name"] in a.refuse:
            return Reply(status=200, ocpi=2001)
        a.accepted.append((body["id"], body["name"]))
        return None

    iop.script = script
    await relay.start()
    yield a
    await relay.stop()
    await iop.close()


def admin_count(route: str, status: int) -> float:
    return REGISTRY.get_sample_value("relay_admin_requests_total", {"route": route, "status": str(status)}) or 0.0


# -- auth ------------------------------------------------------------------------------------------------


async def test_only_the_admin_token_opens_the_admin_routes(admin: Admin) -> None:
    before = admin_count("/admin/status", 401)
    for path in ROUTES:
        for token in (None, "wrong-token", TOKEN, ADMIN[:-1]):
            answer = await admin.call("GET", path, token=token)
            assert "missing or wrong admin token" in problem(answer, 401, "Authorization")
            assert answer[2]["WWW-Authenticate"].startswith("Bearer")
    for path in ("/admin/dead-letters/replay", "/admin/dead-letters/purge"):
        problem(await admin.call("POST", path, token=TOKEN, body={"all": True}), 401)
    problem(await admin.call("GET", "/admin/no-such-route", token=TOKEN), 401)  # nothing said about what exists
    assert admin_count("/admin/status", 401) == before + 4
    assert (await admin.get("/admin/status"))["redis"] == "ok"
    assert (await admin.get("/admin/dead-letters")) == {"items": [], "next": None}
    problem(await admin.call("GET", "/admin/dead-letters/1-0"), 404, "id")
    # The admin token does not open the ingress.
    url = f"{admin.base}/ingress/2.2.1/locations/FR/AB1/LOC1"
    async with (
        aiohttp.ClientSession() as http,
        http.put(url, json={}, headers={"Authorization": f"Bearer {ADMIN}"}) as r,
    ):
        assert r.status == 401
    assert admin_count("/admin/status", 200) >= 1


@pytest.mark.parametrize("admin", [{"RELAY_ADMIN_TOKEN": ""}], indirect=True, ids=["no-admin-token"])
async def test_without_an_admin_token_every_admin_route_is_disabled(admin: Admin) -> None:
    for token in (None, TOKEN, ADMIN, ""):
        for method, path in [("GET", p) for p in ROUTES] + [("POST", "/admin/dead-letters/replay"),
                                                           ("POST", "/admin/dead-letters/purge")]:  # fmt: skip
            answer = await admin.call(method, path, token=token, body={"all": True})
            assert "admin API disabled" in problem(answer, 403, "Authorization")
            assert set(answer[1]) == {"status", "message", "errors"}


def test_the_admin_token_is_a_secret_of_its_own(tmp_path: Path) -> None:
    ops = json.dumps([{"country_code": "FR", "party_id": "AB1", "name": "X"}])
    base = {"RELAY_OPERATORS_JSON": ops, "RELAY_INGRESS_TOKEN": TOKEN}
    assert load(None, env={**base, "RELAY_ADMIN_TOKEN": "a,b"}).admin.tokens() == ("a", "b")
    with pytest.raises(ConfigError, match="admin.token: must differ from every ingress.token"):
        load(None, env={**base, "RELAY_INGRESS_TOKEN": f"x,{TOKEN}", "RELAY_ADMIN_TOKEN": TOKEN})
    (tmp_path / "admin.token").write_text(ADMIN + "\n")
    (tmp_path / "relay.toml").write_text('[admin]\ntoken_file = "admin.token"\n')
    assert load(tmp_path / "relay.toml", env=base).admin.token == ADMIN
    # check-config hides it and warns when it is short.
    env = {"RELAY_CONFIG": str(REPO / "config" / "relay.toml"), "RELAY_INGRESS_TOKEN": "i" * 32,
           "RELAY_ADMIN_TOKEN": "short-admin"}  # fmt: skip
    res = CliRunner().invoke(main, ["check-config"], env=env)
    assert res.exit_code == 0, res.output
    assert "short-admin" not in res.output and json.loads(res.stdout)["admin"]["token"] == "[redacted]"
    assert "admin.token — an admin token is shorter than 16 characters" in res.stderr


# -- status ----------------------------------------------------------------------------------------------


async def test_status_reports_queues_per_shard_dead_letters_link_and_held_keys(admin: Admin) -> None:
    admin.refuse.add("x")
    await admin.put("LOC1", "x")
    await admin.dead(1)
    data: dict[str, Any] = {}

    async def published() -> bool:  # the link state is published on the lease loop's next round
        nonlocal data
        data = await admin.get("/admin/status")
        return bool(data["replicas"])

    await wait_until(published, 10, "a replica in /admin/status")
    loc = data["modules"]["locations"]
    assert loc["dead"] == 1 and loc["queued"] == 0 and loc["oldest_age_s"] == 0
    shards = admin.settings.redis.shards
    assert [s["shard"] for s in loc["shards"]] == list(range(shards))
    key = location_key("FR", "AB1", "LOC1")
    assert [s["dead"] for s in loc["shards"]] == [int(i == shard_of(key, shards)) for i in range(shards)]
    assert [link["state"] for link in data["replicas"].values()] == ["up"]
    assert data["connection"]["state"] == "static" and data["connection"]["iop_party"] == "FR/107"
    assert data["holds"] == {} and data["parked"] == {}
    # The same report as `relay status --json` (one function behind both).
    res = await admin.cli("status", "--json")
    cli = json.loads(res.stdout)
    assert cli.keys() - {"config"} == data.keys() and cli["modules"]["locations"]["shards"] == loc["shards"]
    # A takeover hold, as a reader publishes it.
    until = time.time() + 30
    assert admin.relay.store is not None
    await DeliveryStore(admin.relay.store).publish_holds(2, {"locations|loc:FR:AB1:L9": until}, until)
    hold = (await admin.get("/admin/status"))["holds"]["2"]
    assert hold["keys"] == 1 and hold["first"] == ["locations|loc:FR:AB1:L9"] and 0 < hold["wait_s"] <= 30


# -- listing and showing -----------------------------------------------------------------------------------


async def test_list_filters_and_pages_as_the_cli_does(admin: Admin) -> None:
    admin.refuse.update({"a", "b", "c"})
    for loc, name in (("LOC1", "a"), ("LOC2", "b"), ("LOC3", "c")):
        await admin.put(loc, name)
    rows = await admin.dead(3)
    assert {r["object"] for r in rows} == {f"locations/FR/AB1/LOC{i}" for i in (1, 2, 3)}
    assert all(r["kind"] == "permanent" and r["ocpi_code"] == 2001 and "body" not in r for r in rows)
    ids = [r["dead_id"] for r in rows]
    res = await admin.cli("dlq", "list", "--json")
    assert [json.loads(line)["dead_id"] for line in res.stdout.splitlines()] == ids  # the CLI's order

    async def listed(**params: str) -> list[str]:
        return [r["dead_id"] for r in (await admin.get("/admin/dead-letters", params=params))["items"]]

    assert await listed(module="locations") == ids
    assert await listed(module="sessions") == []
    assert await listed(kind="permanent") == ids
    assert await listed(kind="parked") == []
    assert await listed(reason="ocpi 2001") == ids  # a substring, any case
    assert await listed(reason="no such reason") == []
    by_key = await listed(key="loc:FR:AB1:LOC2")
    assert len(by_key) == 1 and by_key == [r["dead_id"] for r in rows if r["object"].endswith("LOC2")]
    assert await listed(since="1h") == ids
    assert await listed(since="2999-01-01T00:00:00Z") == []
    assert await listed(module="locations", kind="permanent", reason="2001", since="10m") == ids
    # Pages of one, then of two, following `next`.
    for size in (1, 2):
        seen: list[str] = []
        after: str | None = None
        for _ in range(5):
            params = {"limit": str(size), **({"after": after} if after else {})}
            page = await admin.get("/admin/dead-letters", params=params)
            seen += [r["dead_id"] for r in page["items"]]
            after = page["next"]
            if after is None:
                break
        assert seen == ids


async def test_show_one_dead_letter_in_full_by_either_id(admin: Admin) -> None:
    admin.refuse.add("bad")
    await admin.put("LOC1", "bad")
    [row] = await admin.dead(1)
    shown = await admin.get(f"/admin/dead-letters/{row['dead_id']}")
    assert json.loads(shown["body"])["name"] == "bad" and "OCPI 2001" in shown["reason"]
    assert shown == {**row, "body": shown["body"]}
    res = await admin.cli("dlq", "show", row["dead_id"])
    assert json.loads(res.stdout) == shown  # what `relay dlq show` prints
    assert await admin.get(f"/admin/dead-letters/{row['event_id']}") == shown
    problem(await admin.call("GET", "/admin/dead-letters/1-0"), 404, "id")
    problem(await admin.call("GET", f"/admin/dead-letters/{'0' * 28}"), 404, "id")


# -- replay and purge --------------------------------------------------------------------------------------


async def test_replay_dry_run_then_for_real_reaches_the_iop(admin: Admin) -> None:
    admin.refuse.add("old")
    await admin.put("LOC1", "old")
    [row] = await admin.dead(1)
    dry = await admin.post("/admin/dead-letters/replay", {"ids": [row["dead_id"]], "dry_run": True})
    assert dry["summary"] == {"selected": 1, "would_replay": 1} and dry["dry_run"] is True and dry["more"] is False
    # The CLI's --json lines and summary, the same.
    res = await admin.cli("dlq", "replay", row["dead_id"], "--dry-run", "--json")
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert dry["results"] == lines[:-1] and dry["summary"] == lines[-1]
    assert dry["results"][0]["result"] == "would_replay" and dry["results"][0]["from_state"] is True
    assert len(await admin.dead(1)) == 1 and admin.names("LOC1") == []
    admin.refuse.clear()
    done = await admin.post("/admin/dead-letters/replay", {"module": "locations", "reason": "OCPI 2001"})
    assert done["summary"] == {"selected": 1, "replayed": 1}
    assert done["results"] == [{**lines[0], "result": "replayed"}]
    await admin.iop.wait_for(lambda: admin.names("LOC1") == ["old"])  # from state: the current object
    await admin.dead(0)
    again = await admin.post("/admin/dead-letters/replay", {"all": True})
    assert again == {"dry_run": False, "results": [], "summary": {"selected": 0}, "more": False}


async def test_replay_limit_and_force(admin: Admin) -> None:
    admin.refuse.update({"a", "b"})
    await admin.put("LOC1", "a")
    await admin.put("LOC2", "b")
    await admin.dead(2)
    first = await admin.post("/admin/dead-letters/replay", {"all": True, "dry_run": True, "limit": 1, "force": True})
    assert first["summary"] == {"selected": 1, "would_replay": 1} and first["more"] is True
    assert "from_state" not in first["results"][0]  # forced: as it was


@pytest.mark.parametrize("admin", [{"RELAY_FORWARDER_ON_PERMANENT": "park"}], indirect=True, ids=["park"])
async def test_purging_the_parking_dead_letter_unparks_the_key(admin: Admin) -> None:
    admin.refuse.add("1")
    await admin.put("K1", "1")
    [row] = await admin.dead(1)
    key = location_key("FR", "AB1", "K1")
    parked = (await admin.get("/admin/status"))["parked"]
    assert parked == {str(shard_of(key, admin.settings.redis.shards)): {
        "keys": 1, "first": [{"module": "locations", "key": key, "dead_id": row["dead_id"]}]}}  # fmt: skip
    await admin.put("K1", "2")  # parked behind 1
    await admin.dead(2)
    assert admin.names("K1") == []
    dry = await admin.post("/admin/dead-letters/purge", {"ids": [row["dead_id"]], "dry_run": True})
    assert dry["summary"] == {"selected": 1, "would_purge": 1, "would_unpark": 1}
    done = await admin.post("/admin/dead-letters/purge", {"key": key, "kind": "permanent"})
    assert done["summary"] == {"selected": 1, "purged": 1, "unparked": 1}
    ids = {"dead_id": row["dead_id"], "event_id": row["event_id"], "module": "locations", "key": key}
    assert done["results"] == [{**ids, "object": "locations/FR/AB1/K1", "result": "purged", "unparked": True}]
    assert (await admin.get("/admin/status"))["parked"] == {}
    await admin.put("K1", "3")
    await admin.iop.wait_for(lambda: admin.names("K1") == ["3"])
    rest = await admin.post("/admin/dead-letters/purge", {"all": True})
    assert rest["summary"] == {"selected": 1, "purged": 1}
    await admin.dead(0)


# -- hostile input -------------------------------------------------------------------------------------------


async def test_hostile_queries_get_a_4xx_naming_the_parameter(admin: Admin) -> None:
    listing = "/admin/dead-letters"
    cases: list[tuple[Any, str]] = [
        ({"limit": "0"}, "limit"), ({"limit": "100000"}, "limit"), ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"), ({"module": "cars"}, "module"), ({"kind": "weird"}, "kind"),
        ({"since": "bogus"}, "since"), ({"since": "2h30m"}, "since"), ({"since": "9" * 400 + "d"}, "since"),
        ({"reason": "r" * 201}, "reason"), ({"reason": ""}, "reason"), ({"key": "k" * 300}, "key"),
        ({"operator": "FR/AB1"}, "operator"), ({"until": "1h"}, "until"), ({"after": "garbage"}, "after"),
        ({"after": "locations:999:1-0"}, "after"), ({"after": "x" * 100}, "after"),
        ([("limit", "1"), ("limit", "2")], "limit"), ({"\u00e9\u0000": "1"}, "\u00e9\u0000"),
    ]  # fmt: skip
    for params, field in cases:
        problem(await admin.call("GET", listing, params=params), 400, field)
    for ident in ("x", "1-", "-1", "1-1-1", "A" * 28, "1" * 25 + "-0", "%00", "1 0", "replay.json"):
        problem(await admin.call("GET", f"{listing}/{ident}"), 400, "id")
    problem(await admin.call("GET", f"{listing}/{'9' * 5000}"), 400, "id")


async def test_hostile_bodies_get_a_4xx_naming_the_field(admin: Admin) -> None:
    for verb in ("replay", "purge"):
        path = f"/admin/dead-letters/{verb}"
        for raw in (b"", b"{", b"not json", b"\xff\xfe", b"[" * 100_000):
            problem(await admin.call("POST", path, raw=raw), 413 if len(raw) > MAX_BODY_BYTES else 400, "body")
        cases: list[tuple[Any, int, str]] = [
            ([], 400, "body"), ("all", 400, "body"), (None, 400, "body"), (3, 400, "body"),
            ({}, 400, "body"), ({"ids": []}, 400, "body"), ({"dry_run": True}, 400, "body"),
            ({"all": True, "module": "locations"}, 400, "all"), ({"all": True, "ids": ["1-0"]}, 400, "all"),
            ({"all": "yes"}, 400, "all"), ({"dry_run": "true", "all": True}, 400, "dry_run"),
            ({"ids": "1-0"}, 400, "ids"), ({"ids": [1]}, 400, "ids[0]"), ({"ids": ["1-0", "DROP"]}, 400, "ids[1]"),
            ({"ids": [["1-0"]]}, 400, "ids[0]"), ({"ids": ["1-0"] * (MAX_IDS + 1)}, 400, "ids"),
            ({"module": "cars"}, 400, "module"), ({"kind": 1}, 400, "kind"), ({"since": "bogus"}, 400, "since"),
            ({"all": True, "limit": 0}, 400, "limit"), ({"all": True, "limit": 10**30}, 400, "limit"),
            ({"all": True, "until": "1h"}, 400, "until"), ({"all": True, "operator": "FR/AB1"}, 400, "operator"),
            ({"all": True, "extra": {"a": [[[[]]]]}}, 400, "extra"),
            ({"ids": [f"{i}-0" for i in range(20_000)]}, 413, "body"),
        ]  # fmt: skip
        if verb == "purge":
            cases.append(({"all": True, "force": True}, 400, "force"))  # the CLI's purge has no --force
        for body, status, field in cases:
            problem(await admin.call("POST", path, body=body), status, field)
        problem(await admin.call("GET", path), 405)
    problem(await admin.call("PUT", "/admin/status"), 405, "method")
    problem(await admin.call("DELETE", "/admin/dead-letters/1-0"), 405, "method")
    problem(await admin.call("GET", "/admin/nothing/here"), 404, "url")
    # Nothing of the above touched a dead letter, nor broke the routes.
    assert (await admin.get("/admin/status"))["modules"]["locations"]["dead"] == 0


def test_admin_operations_describe_every_route() -> None:
    assert all(isinstance(op, AdminOperation) for op in ADMIN_OPERATIONS)
    assert [(op.method, op.path) for op in ADMIN_OPERATIONS] == [
        ("GET", "/admin/status"), ("GET", "/admin/dead-letters"), ("GET", "/admin/dead-letters/{id}"),
        ("POST", "/admin/dead-letters/replay"), ("POST", "/admin/dead-letters/purge"),
    ]  # fmt: skip
    import msgspec

    for op in ADMIN_OPERATIONS:
        for t in (op.query, op.body, op.response):
            if t is not None:
                assert issubclass(t, msgspec.Struct)
        assert 401 in op.errors and 403 in op.errors
    msgspec.json.schema_components([t for op in ADMIN_OPERATIONS for t in (op.query, op.body, op.response) if t])
