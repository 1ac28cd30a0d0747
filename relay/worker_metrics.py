"""/metrics under ``relay serve --workers N``: every worker's series in one answer, labelled ``worker="<i>"``.

The workers share the ingress port (SO_REUSEPORT), so a scrape reaches one of them at random. Each worker
therefore also serves its own registry on a private unix socket, ``worker-<i>.sock`` in a directory the
supervisor creates (0700, removed when it stops; relay.supervisor), and the public /metrics of any worker
fetches its siblings' text over their sockets (concurrently, ``SIBLING_TIMEOUT_S`` each), adds the label
``worker="<i>"`` to every sample of every worker (its own included) and answers the merged exposition: HELP
and TYPE once per family, the samples of worker 0, then 1… A sibling that does not answer (restarting, stuck)
is left out of that answer and counted in ``relay_worker_scrape_errors`` (relay.metrics), which carries no
worker label. One process (no ``--workers``, or 1) keeps relay.metrics.handle_metrics: no label, no socket.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from relay import metrics

__all__ = ["SIBLING_TIMEOUT_S", "WorkerMetrics", "make_socket_dir", "merge", "parse", "render"]

log = structlog.get_logger(__name__)

SIBLING_TIMEOUT_S = 1.0  # per sibling, all fetched at once: a scrape waits at most about this long for them
WORKER_LABEL = "worker"
_SUN_PATH_MAX = 107  # a unix socket's path, in bytes (sockaddr_un.sun_path, Linux: 108 with the NUL)


def make_socket_dir() -> Path:
    """A new private directory (0700) for the workers' metrics sockets: in ``$XDG_RUNTIME_DIR`` when set, else
    the temporary directory (TMPDIR, /tmp), or /tmp when that path is too long for a socket's."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if (
        not os.path.isdir(base)
        or len(os.fsencode(base)) + len("/relay-workers-xxxxxxxx/worker-999.sock") > _SUN_PATH_MAX
    ):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="relay-workers-", dir=base))  # mkdtemp: 0700, a fresh name


def parse(text: str) -> list[Metric]:
    """The families of one exposition (ValueError if it is not one)."""
    return list(text_string_to_metric_families(text))


def merge(workers: Mapping[int, Iterable[Metric]]) -> list[Metric]:
    """The families of several workers (worker index → its families), each sample labelled with its worker:
    one family per name (HELP and TYPE of the first worker that has it), workers in index order."""
    families: dict[str, Metric] = {}
    for index in sorted(workers):
        worker = str(index)
        for family in workers[index]:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, WORKER_LABEL: worker}) for s in family.samples)
    return list(families.values())


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render(families: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition of these families, written by prometheus_client."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def _response(body: bytes) -> web.Response:
    resp = web.Response(body=body)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp


@dataclass(frozen=True)
class WorkerMetrics:
    """One worker's side: its private socket, and the public /metrics that merges every worker's."""

    directory: Path
    index: int
    count: int

    def socket(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    async def serve(self) -> web.AppRunner:
        """Serve this worker's own registry (GET /metrics, unmerged) on its socket; the caller cleans it up."""
        app = web.Application()
        app.router.add_get("/metrics", metrics.handle_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        path = self.socket(self.index)
        with suppress(FileNotFoundError):
            path.unlink()  # left by the previous process of this slot (killed)
        try:
            await web.UnixSite(runner, str(path)).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def unlink(self, *, directory: bool = False) -> None:
        """Remove this worker's socket (after its runner stopped) and, if asked, the directory once empty."""
        with suppress(OSError):
            self.socket(self.index).unlink()
        if directory:
            with suppress(OSError):  # not empty: a sibling still has its socket there and removes it last
                self.directory.rmdir()

    async def _fetch(self, index: int) -> list[Metric] | None:
        """A sibling's own families, or None (logged) if it did not answer in time, or not an exposition."""
        timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)
        try:
            connector = aiohttp.UnixConnector(path=str(self.socket(index)))
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                async with http.get("http://worker/metrics") as resp:
                    resp.raise_for_status()
                    return parse(await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("metrics_worker_unanswered", sibling=index, error=str(exc) or type(exc).__name__,
                        hint="its series are missing from this scrape (relay_worker_scrape_errors)")  # fmt: skip
            return None

    async def exposition(self) -> bytes:
        """Every answering worker's series, labelled, then relay_worker_scrape_errors."""
        siblings = [i for i in range(self.count) if i != self.index]
        fetched = await asyncio.gather(*(self._fetch(i) for i in siblings))
        workers = {i: families for i, families in zip(siblings, fetched, strict=True) if families is not None}
        workers[self.index] = parse(generate_latest(REGISTRY).decode())
        gauge = metrics.WORKER_SCRAPE_ERRORS
        gauge.set(len(siblings) + 1 - len(workers))
        return render([*merge(workers), *gauge.collect()])

    async def handle(self, _: web.Request) -> web.Response:
        """GET /metrics on the ingress port of a worker: every worker's series."""
        return _response(await self.exposition())
