"""Real Valkey topologies for the Sentinel and Cluster tests, from the pip-installed server binary.

``ValkeyProcess`` is one valkey-server (or sentinel) on 127.0.0.1:<free port> in its own directory;
``SentinelSet`` is a primary, one replica and three sentinels; ``ValkeyCluster`` is three primaries formed
with CLUSTER MEET / ADDSLOTSRANGE. Every process dies with the test process (PR_SET_PDEATHSIG) and in the
fixtures' teardown, also when the test or the start fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from relay.embedded_redis import server_binary
from tests.loopback import free_port

HOST = "127.0.0.1"
SERVICE = "mymaster"
HASH_SLOTS = 16384
_LOG = "valkey.log"
_OUTPUT = "output.log"  # the process's stdout/stderr: what it says before its log file is open


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(none)"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ValkeyStartFailed(RuntimeError):
    pass


class ValkeyProcess:
    """One valkey-server on 127.0.0.1:<port> in its own directory, with ``config`` lines appended to its config.

    Data nodes persist with an append-only file (``appendfsync`` everysec by default) and no RDB snapshots;
    ``sentinel=True`` runs it in Sentinel mode instead (its config file is then Sentinel's to rewrite).
    ``cluster_bus=True`` gives it a free cluster bus port too (``bus_port``) rather than port + 10000.
    """

    def __init__(
        self,
        directory: Path,
        config: Sequence[str] = (),
        *,
        port: int | None = None,
        sentinel: bool = False,
        cluster_bus: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
    ) -> None:
        self.dir = Path(directory).resolve()
        self.config = list(config)
        self.sentinel = sentinel
        self.appendfsync = appendfsync
        self._port_chosen = port is None  # a port of ours may be re-chosen if someone took it before we bound it
        self.port = port or free_port()
        self.bus_port: int | None = free_port() if cluster_bus else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    def __repr__(self) -> str:
        kind = "sentinel" if self.sentinel else "valkey"
        return f"<{kind} {HOST}:{self.port} pid={self.proc.pid if self.proc else None} alive={self.alive}>"

    @property
    def conf(self) -> Path:
        return self.dir / ("sentinel.conf" if self.sentinel else "valkey.conf")

    @property
    def log(self) -> Path:
        return self.dir / _LOG

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A new client of this node (the caller closes it)."""
        return aioredis.Redis(host=HOST, port=self.port, **kwargs)

    def _write_config(self) -> None:
        lines = ["bind 127.0.0.1", f"dir {self.dir}", f"logfile {self.log}", "daemonize no"]
        if not self.sentinel:
            lines += ["appendonly yes", f"appendfsync {self.appendfsync}", 'save ""']
        self.conf.write_text("\n".join([*lines, *self.config]) + "\n")

    def _spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its config file (its id, the primary it follows, the sentinels it met): a restart
        # must find that state, so the file is only written before the first start.
        if not self._started_once or not self.sentinel:
            self._write_config()
        args = [str(server_binary()), str(self.conf)]
        if self.sentinel:
            args.append("--sentinel")
        args += ["--port", str(self.port)]
        if self.bus_port is not None:
            args += ["--cluster-port", str(self.bus_port)]
        with (self.dir / _OUTPUT).open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_die_with_parent
            )

    def _failure(self, why: str) -> ValkeyStartFailed:
        return ValkeyStartFailed(
            f"{self!r} {why}\n--- {self.log} ---\n{_tail(self.log)}\n--- {self.dir / _OUTPUT} ---\n"
            f"{_tail(self.dir / _OUTPUT)}"
        )

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
        except OSError:
            return False
        try:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)) == b"+PONG\r\n"  # not -LOADING
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING; raise ValkeyStartFailed with its log's tail if it does not."""
        if self.alive:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(3):
            self._spawn()
            deadline = time.monotonic() + timeout
            while not await self._pong():
                assert self.proc is not None
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise self._failure(f"did not answer PING within {timeout}s")
                await asyncio.sleep(0.02)
            else:
                self._started_once = True
                return
            # It exited. Another process may have taken our free port in between: choose others once more.
            taken = "Address already in use" in _tail(self.log) + _tail(self.dir / _OUTPUT)
            if not (taken and self._port_chosen and not self._started_once and attempt < 2):
                raise self._failure(f"exited with status {self.proc.returncode}")
            self.port = free_port()
            if self.bus_port is not None:
                self.bus_port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (it writes its files and exits), then SIGKILL after ``timeout`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop it if it runs, then start it again on the same port and directory (its data and config)."""
        self.stop()
        await self.start(timeout)


async def _wait(cond: Any, timeout: float, what: Any) -> None:
    """Poll an async condition; fail with ``what()`` after ``timeout`` seconds (connection errors count as no)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, aioredis.RedisError):
            if await cond():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{await what()}: not met within {timeout}s")
        await asyncio.sleep(0.05)


async def _command(node: ValkeyProcess, *args: Any) -> Any:
    """One command on a node through a short-lived client, answers decoded (``CLUSTER``, ``NODES``: raw text)."""
    client = node.client(decode_responses=True, socket_timeout=2.0)
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def _info(node: ValkeyProcess, section: str) -> dict[str, Any]:
    client = node.client(decode_responses=True, socket_timeout=2.0)
    try:
        return await client.info(section)
    finally:
        await client.aclose()


async def _role(node: ValkeyProcess) -> str:
    reply = await _command(node, "ROLE")
    return _text(reply[0])


class SentinelSet:
    """A primary, ``replicas`` replicas (``replicaof``; one by default) and three sentinels watching them as
    ``mymaster``, quorum 2."""

    def __init__(
        self,
        base: Path,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10000,
        sentinels: int = 3,
        quorum: int = 2,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        service: str = SERVICE,
        replicas: int = 1,
    ) -> None:
        self.base = Path(base)
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = quorum
        self.service = service
        # Replicas sync at once (no 5 s wait for more replicas to share a diskless transfer).
        fast_sync = ["repl-diskless-sync-delay 0"]
        self.servers = [ValkeyProcess(self.base / "primary", fast_sync, appendfsync=appendfsync)] + [
            ValkeyProcess(self.base / ("replica" if i == 0 else f"replica{i}"), fast_sync, appendfsync=appendfsync)
            for i in range(replicas)
        ]
        self.sentinels = [ValkeyProcess(self.base / f"sentinel{i}", sentinel=True) for i in range(sentinels)]
        self._primary = 0  # index in servers of the node the sentinels name, as far as this object knows
        self._killed_port: int | None = None
        self._killed_at: float | None = None

    @property
    def primary(self) -> ValkeyProcess:
        return self.servers[self._primary]

    @property
    def replica(self) -> ValkeyProcess:
        return self.replicas[0]

    @property
    def replicas(self) -> list[ValkeyProcess]:
        return [s for i, s in enumerate(self.servers) if i != self._primary]

    @property
    def url(self) -> str:
        seeds = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{seeds}/{self.service}/0"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    async def start(self, timeout: float = 30.0) -> None:
        """Start the primary, the replica (wait until in sync), then the sentinels; wait until each sentinel
        names the primary and sees the replica and the other sentinels."""
        primary = self.servers[0]
        await primary.start()
        for replica in self.servers[1:]:
            replica.config.append(f"replicaof {HOST} {primary.port}")
            await replica.start()
        await _wait(self._replica_in_sync, timeout, self._replication_state)
        monitor = [
            "sentinel resolve-hostnames no",
            f"sentinel monitor {self.service} {HOST} {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
        ]
        for sentinel in self.sentinels:
            sentinel.config.extend(monitor)
            await sentinel.start()
        await _wait(self._sentinels_ready, timeout, self._sentinel_state)

    async def _replica_in_sync(self) -> bool:
        return all([(await _info(r, "replication")).get("master_link_status") == "up" for r in self.replicas])

    async def _replication_state(self) -> str:
        try:
            return f"replica in sync: {await _info(self.replica, 'replication')}"
        except (OSError, aioredis.RedisError) as e:
            return f"replica in sync: {e!r}"

    async def _sentinel_view(self, sentinel: ValkeyProcess) -> tuple[int, set[int], int]:
        """(primary port, ports of the replicas it sees up, number of other sentinels it knows)."""
        addr = await _command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        replicas = await _command(sentinel, "SENTINEL", "REPLICAS", self.service)
        others = await _command(sentinel, "SENTINEL", "SENTINELS", self.service)
        up = set()
        for entry in replicas:  # a flat [field, value, ...] list, or a dict when redis-py parsed it
            fields = entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True))
            flags = fields["flags"]
            if not {"s_down", "o_down", "disconnected"} & (set(flags.split(",")) if isinstance(flags, str) else flags):
                up.add(int(fields["port"]))
        return int(addr[1]), up, len(others)

    async def _sentinels_ready(self) -> bool:
        want = (self.primary.port, {r.port for r in self.replicas}, len(self.sentinels) - 1)
        views = [await self._sentinel_view(s) for s in self.sentinels]
        return all(view == want for view in views)

    async def _sentinel_state(self) -> str:
        views = []
        for s in self.sentinels:
            try:
                views.append(f"{s.port}: {await self._sentinel_view(s)}")
            except (OSError, aioredis.RedisError) as e:
                views.append(f"{s.port}: {e!r}")
        want = (self.primary.port, {r.port for r in self.replicas}, len(self.sentinels) - 1)
        return f"sentinels (primary, replicas up, other sentinels) want {want}, got {'; '.join(views)}"

    async def primary_address(self) -> tuple[str, int]:
        """The primary as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            if sentinel.alive:
                with contextlib.suppress(OSError, aioredis.RedisError):
                    host, port = await _command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                    return _text(host), int(port)
        raise AssertionError("no sentinel answers")

    def kill_primary(self) -> ValkeyProcess:
        """SIGKILL the current primary and return it (``restart()`` brings it back, made a replica by the sentinels)."""
        primary = self.primary
        primary.kill()
        self._killed_port = primary.port
        self._killed_at = time.monotonic()
        return primary

    async def wait_failover(self, timeout: float = 30.0) -> float:
        """Wait until every live sentinel names a new primary and that node answers ROLE as master.

        Returns the seconds since ``kill_primary()`` (since this call if nothing was killed).
        """
        start = self._killed_at if self._killed_at is not None else time.monotonic()
        old = self._killed_port if self._killed_port is not None else self.primary.port
        by_port = {s.port: i for i, s in enumerate(self.servers)}

        async def promoted() -> bool:
            named = {
                int((await _command(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service))[1])
                for s in self.sentinels
                if s.alive
            }
            if len(named) != 1 or old in named:
                return False
            port = named.pop()
            if port not in by_port or await _role(self.servers[by_port[port]]) != "master":
                return False
            self._primary = by_port[port]
            return True

        async def state() -> str:
            return f"failover away from {HOST}:{old}; {await self._sentinel_state()}"

        await _wait(promoted, timeout, state)
        self._killed_port = self._killed_at = None
        return time.monotonic() - start

    def stop(self) -> None:
        """Stop the sentinels first (no failover of a stopping primary), then the data nodes."""
        for process in [*self.sentinels, *self.servers]:
            process.stop()


def slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """The slots split as valkey-cli --cluster create does: 3 nodes → 0-5460, 5461-10922, 10923-16383."""
    per_node = HASH_SLOTS / nodes
    ranges, cursor = [], 0.0
    for i in range(nodes):
        first, last = round(cursor), round(cursor + per_node - 1)
        ranges.append((first, HASH_SLOTS - 1 if i == nodes - 1 else last))
        cursor += per_node
    return ranges


class ValkeyCluster:
    """Three primaries (no replicas) formed with CLUSTER MEET and CLUSTER ADDSLOTSRANGE."""

    def __init__(
        self,
        base: Path,
        *,
        size: int = 3,
        node_timeout_ms: int = 2000,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
    ) -> None:
        self.base = Path(base)
        self.slot_ranges = slot_ranges(size)
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-node-timeout {node_timeout_ms}"]
        self.nodes = [
            ValkeyProcess(self.base / f"node{i}", config, cluster_bus=True, appendfsync=appendfsync)
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """The first node's URL: a seed, from which a cluster client learns the others."""
        return self.nodes[0].url

    def node_for_key(self, key: str | bytes) -> ValkeyProcess:
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return next(n for n, (lo, hi) in zip(self.nodes, self.slot_ranges, strict=True) if lo <= slot <= hi)

    async def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, give each its slots, meet them, and wait until every node says cluster_state:ok
        and all agree on who serves which slots."""
        for node in self.nodes:
            await node.start()
        for node, (lo, hi) in zip(self.nodes, self.slot_ranges, strict=True):
            await _command(node, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for node in self.nodes[1:]:
            await _command(self.nodes[0], "CLUSTER", "MEET", HOST, node.port, node.bus_port)
        await self.wait_ok(timeout)

    async def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node says cluster_state:ok and all agree on the slots (e.g. after a node's restart)."""
        await _wait(self._formed, timeout, self._state)

    async def _slot_map(self, node: ValkeyProcess) -> dict[int, tuple[tuple[int, int], ...]]:
        """{port: its slot ranges} for every connected primary this node knows (CLUSTER NODES)."""
        text = _text(await _command(node, "CLUSTER", "NODES"))
        owners: dict[int, tuple[tuple[int, int], ...]] = {}
        for line in text.splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags or "fail?" in flags or fields[7] != "connected":
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            spans = [s.split("-") for s in fields[8:] if not s.startswith("[")]
            owners[port] = tuple((int(s[0]), int(s[-1])) for s in spans)
        return owners

    async def _formed(self) -> bool:
        want = {n.port: (r,) for n, r in zip(self.nodes, self.slot_ranges, strict=True)}
        for node in self.nodes:
            info = _text(await _command(node, "CLUSTER", "INFO"))
            if "cluster_state:ok" not in info or await self._slot_map(node) != want:
                return False
        return True

    async def _state(self) -> str:
        states = []
        for node in self.nodes:
            try:
                info = _text(await _command(node, "CLUSTER", "INFO")).split()[0]
                states.append(f"{node.port}: {info} {await self._slot_map(node)}")
            except (OSError, aioredis.RedisError) as e:
                states.append(f"{node.port}: {e!r}")
        return "cluster formed: " + "; ".join(states)

    def kill_node(self, i: int) -> ValkeyProcess:
        """SIGKILL node i (its slots are then served by no one: the cluster fails after the node timeout)."""
        self.nodes[i].kill()
        return self.nodes[i]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# The fixtures are named apart from their functions: a test module imports the functions (``from
# tests.topologies import sentinel_set_fixture``) and takes ``sentinel_set`` as an argument, which no linter
# then reads as a redefinition of the import.
@pytest.fixture(name="sentinel_set")
async def sentinel_set_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SentinelSet]:
    """A started SentinelSet; SentinelSet's keyword arguments by indirect parametrization (a dict)."""
    topology = SentinelSet(tmp_path / "sentinel-set", **getattr(request, "param", {}))
    try:
        await topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture(name="valkey_cluster")
async def valkey_cluster_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ValkeyCluster]:
    """A started ValkeyCluster; ValkeyCluster's keyword arguments by indirect parametrization (a dict)."""
    topology = ValkeyCluster(tmp_path / "cluster", **getattr(request, "param", {}))
    try:
        await topology.start()
        yield topology
    finally:
        topology.stop()
