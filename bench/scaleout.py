"""Scenario 5, scale-out: executed commands/s and bridge CPU per command with one instance on SQLite,
one on PostgreSQL and two on PostgreSQL (shared subscriptions on one Mosquitto), in the same run;
then the storage-at-scale figures on PostgreSQL.

Each configuration gets its own Mosquitto, database and device process; the admin load is e2e's
(window 64, ``executed`` events counted). CPU is read from the processes' own counters over the
measured phase: every serve process, Mosquitto, the device process, the harness (the admin), and
every process of the PostgreSQL cluster (the backends of the instances and its background
writers), so "where the 2 cores went" adds up. PostgreSQL is the machine's (127.0.0.1:5432, or
$BROKER_BRIDGE_TEST_POSTGRES), with a database of the run's own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]

from bench import storage
from bench.common import (
    PYTHON,
    BenchError,
    Children,
    Serve,
    cpu_share,
    cpu_snapshot,
    mqtt_client,
    now,
    ratio,
    start_mosquitto,
    wait_serving,
)
from bench.e2e import Admin, Rig, device_stats, load_phase
from bench.ports import free_port
from bench.progress import Tracker
from broker_bridge.store.postgres import PostgresStore

ADMIN_ENV = "BROKER_BRIDGE_TEST_POSTGRES"
MACHINE_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CONFIGS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))


def admin_url() -> str:
    return os.environ.get(ADMIN_ENV) or MACHINE_ADMIN


def _psql(url: str, statement: str) -> None:
    done = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", statement], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"psql: {done.stderr.strip()}")


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A PostgreSQL database of this measurement's own."""
    admin = admin_url()
    name = f"bb_bench_{uuid.uuid4().hex[:10]}"
    try:
        _psql(admin, f"CREATE DATABASE {name}")
    except (BenchError, OSError) as exc:
        raise BenchError(f"no PostgreSQL at {admin} ({exc}); set ${ADMIN_ENV}") from None
    try:
        yield admin.rpartition("/")[0] + "/" + name
    finally:
        _psql(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _postgres_processes(url: str) -> list[psutil.Process]:
    """Every process of the cluster serving ``url`` (postmaster's children), for CPU accounting."""
    conn = await asyncpg.connect(url)
    try:
        own = await conn.fetchval("SELECT pg_backend_pid()")
        postmaster = psutil.Process(own).parent()
    finally:
        await conn.close()
    found = [postmaster]
    for child in postmaster.children():
        if child.pid != own:  # this connection's backend is gone by now
            found.append(child)
    return found


async def _start_instance(children: Children, db: str, port: int, name: str, log_level: str) -> Serve:
    argv = [PYTHON, "-m", "broker_bridge.cli", "serve", "--db", db, "--broker-url", f"mqtt://127.0.0.1:{port}"]
    argv += ["--log-level", log_level, "--instance", name]
    env = {"BROKER_BRIDGE_HTTP_LISTEN": f"127.0.0.1:{free_port()}", "BROKER_BRIDGE_API_KEYS": '["bench"]'}
    child = await children.start(f"serve-{name}", argv, pipe_stdout=False, env=env)
    await wait_serving(child, port, 30.0)
    return Serve(child=child, ps=child.ps, port=port, db=Path(db) if not db.startswith("postgresql") else Path("-"))


async def _one(
    children: Children,
    *,
    engine: str,
    instances: int,
    db: str,
    endpoints: int,
    count: int,
    window: int,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
) -> dict[str, Any]:
    mosquitto, port = await start_mosquitto(children)
    serves = [await _start_instance(children, db, port, f"b{i + 1}", log_level) for i in range(instances)]
    app_version = f"bench{uuid.uuid4().hex[:8]}-v1"
    tokens = [f"dev{i}" for i in range(endpoints)]
    argv = [PYTHON, "-m", "bench.devices", "--port", str(port), "--app-version", app_version]
    argv += ["--prefix", "dev", "--start", "0", "--count", str(endpoints)]
    device = await children.start("devices", argv)
    await device.read_line("READY", timeout_s)
    procs: dict[str, psutil.Process] = {f"serve-{i + 1}": s.ps for i, s in enumerate(serves)}
    procs.update({"mosquitto": mosquitto.ps, "devices": device.ps, "harness": psutil.Process()})
    rig = Rig("mosquitto", port, serves[0], [device], app_version, tokens, 0.0, procs)
    label = f"scale-out {engine} x{instances}"
    async with mqtt_client(port, f"bench-admin-{uuid.uuid4().hex[:6]}") as client:
        admin = Admin(client, app_version, tokens)
        await admin.subscribe()
        reader = asyncio.create_task(admin.pump())
        try:
            # Warm up first: pools fill and the cluster's backends exist before CPU is counted.
            await load_phase(rig, admin, first=1, count=max(50, count // 10), window=window, warmup=0,
                             rate=None, tracker=tracker, label=f"{label} warm-up", timeout_s=timeout_s)
            if engine == "postgresql":
                for index, ps in enumerate(await _postgres_processes(db)):
                    procs[f"postgres-{index}"] = ps
            start = max(50, count // 10) + 1
            before, started = cpu_snapshot(procs), now()
            full = await load_phase(rig, admin, first=start, count=count, window=window, warmup=0, rate=None,
                                    tracker=tracker, label=label, timeout_s=timeout_s)
            elapsed_s = now() - started
            cores = cpu_share(before, cpu_snapshot(procs), elapsed_s)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    for serve in serves:
        if not serve.child.alive:
            raise BenchError(f"an instance died: {serve.child.tail()}")
    serve_cpu_s = sum(v for k, v in cores.items() if k.startswith("serve-")) * elapsed_s
    pg_cores = round(sum(v for k, v in cores.items() if k.startswith("postgres-")), 3)
    split = {k: v for k, v in cores.items() if not k.startswith("postgres-")}
    if engine == "postgresql":
        split["postgresql"] = pg_cores
    return {
        "engine": engine,
        "instances": instances,
        "executed_per_s": full.get("per_s"),
        "latency_ms": {k: full.get(k) for k in ("latency", "latency_receipt", "latency_reply") if k in full},
        "cpu_cores": split,
        "bridge_cpu_ms_per_command": round(serve_cpu_s / count * 1000, 3),
        "errors": full.get("errors"),
        "devices": await device_stats(rig),
    }


async def measure(
    children: Children,
    *,
    endpoints: int,
    count: int,
    window: int,
    rows: int,
    storage_endpoints: int,
    samples: int,
    tracker: Tracker,
    timeout_s: float,
    log_level: str,
    repeats: int = 1,
) -> dict[str, Any]:
    """Each configuration ``repeats`` times, interleaved (sqlite, pg x1, pg x2, sqlite, ...), so a
    slow stretch of this shared machine falls on all of them; a configuration's figures are the
    median of its repetitions (measured: one run of each varied by up to 25% from run to run)."""
    results: dict[str, Any] = {"postgres": admin_url().rpartition("@")[2], "repeats": repeats, "runs": []}
    every: dict[tuple[str, int], list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    for repeat in range(repeats):
        for engine, instances in CONFIGS:
            workdir = children.workdir / f"{engine}-{instances}-{repeat + 1}"
            workdir.mkdir(exist_ok=True)
            sub = Children(workdir)
            async with contextlib.AsyncExitStack() as stack:
                db = str(workdir / "bridge.db") if engine == "sqlite" else await stack.enter_async_context(database())
                stack.push_async_callback(sub.stop_all)  # the instances stop before their database is dropped
                run = await _one(sub, engine=engine, instances=instances, db=db, endpoints=endpoints, count=count,
                                 window=window, tracker=tracker, timeout_s=timeout_s, log_level=log_level)
            every[(engine, instances)].append(run)
    for runs in every.values():
        results["runs"].append(_median_run(runs))
    by = {(r["engine"], r["instances"]): r for r in results["runs"]}
    one, two, lite = by[("postgresql", 1)], by[("postgresql", 2)], by[("sqlite", 1)]
    results["cpu_per_command_2_vs_1"] = ratio(two["bridge_cpu_ms_per_command"], one["bridge_cpu_ms_per_command"])
    results["postgres_vs_sqlite_executed"] = ratio(one["executed_per_s"], lite["executed_per_s"])
    results["two_vs_one_executed"] = ratio(two["executed_per_s"], one["executed_per_s"])
    results["storage"] = await measure_storage(rows, storage_endpoints, samples, tracker)
    return results


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median rate (its latencies and CPU split as measured), with the
    median CPU per command of all of them and every repetition's two figures beside."""
    ordered = sorted(runs, key=lambda r: r["executed_per_s"] or 0.0)
    middle = dict(ordered[(len(ordered) - 1) // 2])
    cpu = sorted(r["bridge_cpu_ms_per_command"] for r in runs)
    middle["bridge_cpu_ms_per_command"] = cpu[(len(cpu) - 1) // 2]
    middle["repetitions"] = [
        {"executed_per_s": r["executed_per_s"], "bridge_cpu_ms_per_command": r["bridge_cpu_ms_per_command"]}
        for r in runs
    ]
    return middle


# -- storage at scale on PostgreSQL ------------------------------------------------------------------
async def build_pg(url: str, rows: int, endpoints: int, tracker: Tracker) -> dict[str, Any]:
    """The schema through PostgresStore, then the same mix of rows as the SQLite storage scenario,
    with COPY (indexes dropped and re-created from their own definitions)."""
    async with PostgresStore(url):
        pass
    started = time.perf_counter()
    now_us = time.time_ns() // 1000
    conn = await asyncpg.connect(url)
    try:
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'commands' AND indexname <> 'commands_pkey'"
        )
        for index in indexes:
            await conn.execute(f"DROP INDEX {index['indexname']}")
        with tracker.step(f"scale-out storage: build {rows:,} rows on PostgreSQL", total=rows) as advance:
            generated = list(storage._rows(rows, endpoints, now_us, 7, advance))
        columns = [c.strip() for c in storage.COLUMNS.split(",")]
        await conn.copy_records_to_table("commands", records=generated, columns=columns)
        for index in indexes:
            await conn.execute(index["indexdef"])
        await conn.execute("UPDATE commands SET announced = 1")  # as in the SQLite scenario: all announced
        await conn.execute("VACUUM ANALYZE commands")  # autovacuum would do it on its own after the load
        states = {r[0]: r[1] for r in await conn.fetch("SELECT state, count(*) FROM commands GROUP BY state")}
        due = await conn.fetchval(
            "SELECT count(*) FROM commands WHERE state IN ('pending', 'in_progress') AND expires_at <= $1", now_us
        )
        size = await conn.fetchval("SELECT pg_total_relation_size('commands')")
    finally:
        await conn.close()
    return {
        "rows": rows,
        "endpoints": endpoints,
        "states": states,
        "due": due,
        "build_s": round(time.perf_counter() - started, 2),
        "table_bytes": size,
        "bytes_per_command": round(size / rows, 1),
        "built_at": datetime.now(UTC).isoformat(),
    }


async def measure_storage(rows: int, endpoints: int, samples: int, tracker: Tracker) -> dict[str, Any]:
    async with database() as url:
        info = await build_pg(url, rows, endpoints, tracker)
        results: dict[str, Any] = {"database": info}
        results["at_scale"] = await storage.measure_store(
            Path("-"), info, samples, tracker, f"PostgreSQL {rows:,} rows", opener=partial(PostgresStore, url)
        )
    return results
