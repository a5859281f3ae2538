"""The run's outputs: ratios to the in-run baselines, the JSON file, the Markdown summary, the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import ratio

SPEC = {"storage_rows": 1_000_000, "fanout_devices": 10_000, "expire": 100_000}


def _get(data: dict[str, Any], *path: str) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _row(
    name: str,
    value: float | None,
    target: float,
    op: str,
    unit: str,
    basis: str,
    *,
    full_scale: bool = True,
    baseline_ratio: float | None = None,
) -> dict[str, Any]:
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "target": target,
        "op": op,
        "met": met,
        "basis": basis,
        "full_scale": full_scale,
        "baseline_ratio": baseline_ratio,
    }


def _expire_row(name: str, expire: dict[str, Any], baseline_ratio: float | None = None) -> dict[str, Any]:
    """The expiry target (100k in 2 s), scaled to 100k when the run expired fewer."""
    full = expire["expired"] == SPEC["expire"]
    basis = f"{expire['expired']:,} expired in {expire['seconds']} s" + ("" if full else ", scaled to 100k")
    return _row(name, expire["per_100k_s"], 2.0, "<=", "s", basis, full_scale=full, baseline_ratio=baseline_ratio)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure the issue names, computed (never asserted)."""
    s = results.get("scenarios", {})
    rows: list[dict[str, Any]] = []
    for broker, goal in (("mosquitto", 0.5), ("amqtt", 0.7)):
        e2e = _get(s, "e2e", broker, "full", "per_s")
        echo = _get(s, "echo", broker, "window_64", "per_s")
        if e2e is not None and echo is not None:
            rows.append(
                _row(
                    f"e2e executed/s ÷ raw echo round trips/s (w64), {broker}",
                    ratio(e2e, echo),
                    goal,
                    ">=",
                    "ratio",
                    f"{e2e} / {echo}",
                )
            )
    for broker in ("mosquitto", "amqtt"):
        light = _get(s, "e2e", broker, "light", "latency_receipt", "p50_ms")
        echo_w1 = _get(s, "echo", broker, "window_1", "latency", "p50_ms")
        if light is not None and echo_w1 is not None:
            rows.append(
                _row(
                    f"invoke→receipt p50 at 10% load ÷ raw echo p50 (w1), {broker}",
                    ratio(light, echo_w1),
                    1.5,
                    "<=",
                    "ratio",
                    f"{light} ms / {echo_w1} ms",
                )
            )
    storage = s.get("storage")
    if storage:
        full = _get(storage, "db", "rows") == SPEC["storage_rows"]
        rows_label = f"{_get(storage, 'db', 'rows'):,} rows"
        big, small, scale = storage["at_scale"], storage["baseline"], storage["scale_ratios"]
        base_rows = _get(storage, "baseline_db", "rows")
        for label, value, base, key in (
            ("get by id", big["get"]["p99_ms"], small["get"]["p99_ms"], "get_p99"),
            ("poll one endpoint (store.poll)", big["poll"]["p99_ms"], small["poll"]["p99_ms"], "poll_p99"),
            (
                "outstanding list (store.delivery)",
                big["delivery"]["p99_ms"],
                small["delivery"]["p99_ms"],
                "delivery_p99",
            ),
            (
                "history page, worst filter",
                big["history_worst_p99_ms"],
                small["history_worst_p99_ms"],
                "history_worst_p99",
            ),
        ):
            rows.append(
                _row(
                    f"store {label} p99, {rows_label}",
                    value,
                    10.0,
                    "<=",
                    "ms",
                    f"{base_rows:,}-row DB: {base} ms",
                    full_scale=full,
                    baseline_ratio=scale[key],
                )
            )
        expire = big["expire"]
        rows.append(
            _expire_row(
                f"expire 100k due commands scattered over the ids (store.expire_due, batches of {expire.get('batch')})",
                expire,
                baseline_ratio=scale["expire_per_command"],
            )
        )
        ordered = storage.get("creation_order")
        if ordered:
            rows.append(
                _expire_row(
                    "expire 100k due commands, the same rows in creation order (ids as the service assigns them)",
                    ordered,
                )
            )
        rss = _get(storage, "serve_rss_mb", "max_mb")
        empty = _get(storage, "serve_rss_empty_db_mb", "max_mb")
        rows.append(
            _row(
                f"serve RSS on the {rows_label} DB",
                rss,
                100.0,
                "<=",
                "MB",
                f"empty DB: {empty} MB",
                full_scale=full,
                baseline_ratio=scale["serve_rss"],
            )
        )
    fanout = s.get("fanout")
    if fanout:
        steady = _get(s, "e2e", "mosquitto", "full", "per_s")
        ideal = fanout["devices"] / steady if steady else None
        rows.append(
            _row(
                f"fan-out to {fanout['devices']:,} devices: all executed",
                fanout["all_executed_s"],
                10.0,
                "<=",
                "s",
                f"all received {fanout['all_received_s']} s"
                + (f"; steady e2e rate predicts {ideal:.1f} s" if ideal else ""),
                full_scale=fanout["devices"] >= SPEC["fanout_devices"],
                baseline_ratio=ratio(fanout["all_executed_s"], ideal),
            )
        )
    scale_out = s.get("scaleout")
    if scale_out:
        rows += _scaleout_targets(scale_out)
    return rows


def _scaleout_targets(scale_out: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["engine"], r["instances"]): r for r in scale_out["runs"]}
    one, two, lite = by[("postgresql", 1)], by[("postgresql", 2)], by[("sqlite", 1)]
    rows = [
        _row(
            "bridge CPU per executed command, 2 instances ÷ 1 (PostgreSQL, Mosquitto)",
            scale_out["cpu_per_command_2_vs_1"],
            1.15,
            "<=",
            "ratio",
            f"{two['bridge_cpu_ms_per_command']} / {one['bridge_cpu_ms_per_command']} ms",
        ),
        _row(
            "executed/s, PostgreSQL 1 instance ÷ SQLite 1 instance",
            scale_out["postgres_vs_sqlite_executed"],
            0.8,
            ">=",
            "ratio",
            f"{one['executed_per_s']} / {lite['executed_per_s']}",
        ),
    ]
    big = _get(scale_out, "storage", "at_scale")
    if big:
        db_rows = _get(scale_out, "storage", "database", "rows")
        full = db_rows == SPEC["storage_rows"]
        for label, value in (
            ("get by id", big["get"]["p99_ms"]),
            ("poll one endpoint", big["poll"]["p99_ms"]),
            ("outstanding list", big["delivery"]["p99_ms"]),
            ("history page, worst filter", big["history_worst_p99_ms"]),
        ):
            rows.append(_row(f"PostgreSQL {label} p99, {db_rows:,} rows", value, 10.0, "<=", "ms", "store method",
                             full_scale=full))
        rows.append(_expire_row(f"PostgreSQL: expire {big['expire']['due']:,} due commands", big["expire"]))
    return rows


# -- JSON -------------------------------------------------------------------------------------------
def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


# -- Markdown ---------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _lat(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("count"):
        return "-"
    return f"{_fmt(summary['p50_ms'], 2)} / {_fmt(summary['p99_ms'], 2)}"


def _cpu(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "-"
    return ", ".join(f"{role} {share:.2f}" for role, share in cpu.items())


def _per_command(phase: dict[str, Any]) -> str:
    """The serving process's CPU time per executed command: steadier than a rate on a shared machine."""
    cpu, rate = phase.get("cpu_cores") or {}, phase.get("per_s")
    cores = cpu.get("serve", cpu.get("serve+amqtt"))
    if not isinstance(cores, int | float) or not rate:
        return "-"
    return f"{cores / rate * 1000:.2f} ms"


def _busy_elsewhere(node: Any) -> list[float]:
    """Every "rest of machine" CPU figure in the results."""
    found: list[float] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "rest of machine" and isinstance(value, int | float):
                found.append(float(value))
            else:
                found += _busy_elsewhere(value)
    elif isinstance(node, list):
        for value in node:
            found += _busy_elsewhere(value)
    return found


def _caveats(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    lines = []
    busy = _busy_elsewhere(results.get("scenarios", {}))
    if busy and max(busy) > 0.3:
        lines.append(
            f"**Shared machine:** besides the benchmark's own processes, the 2 cores were busy with "
            f"{min(busy):.2f}-{max(busy):.2f} cores of other work (kernel networking, other people's processes) "
            "during the measured phases (column *rest of machine*). Absolute figures are then low and noisy; "
            "the ratios pair figures measured close in time (echo then e2e per broker)."
        )
    if meta.get("broker_bridge_uncommitted"):
        lines.append(
            f"Code measured: {meta.get('git')} plus uncommitted changes to "
            f"{', '.join(meta['broker_bridge_uncommitted'])}."
        )
    return [*(f"{line}\n" for line in lines)]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    versions = meta["versions"]
    s = results.get("scenarios", {})
    out = [
        f"# broker-bridge benchmark: {meta['mode']} run, {meta['started_at']}",
        "",
        f"`{meta['command']}` · {meta['cpus']} cores · Python {meta['python']}"
        f" · aiomqtt {versions.get('aiomqtt')} · amqtt {versions.get('amqtt')}"
        f" · {versions.get('mosquitto') or 'no mosquitto'} · took {meta.get('duration_s', '?')} s"
        f" · serve log level `{meta['serve_log_level']}` · load average at start / end"
        f" {meta.get('load_average_at_start', ['?'])[0]} / {meta.get('load_average_at_end', ['?'])[0]}",
        "",
        *_caveats(results),
        "## Targets (computed, not asserted)",
        "",
        "| figure | value | target | met | basis | xbaseline |",
        "|---|---:|---:|:---:|---|---:|",
    ]
    for row in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        if not row["full_scale"] and row["met"] is not None:
            met += " (smoke scale)"
        unit = "" if row["unit"] == "ratio" else f" {row['unit']}"
        out.append(
            f"| {row['name']} | {_fmt(row['value'], 3 if row['unit'] == 'ratio' else 2)}{unit} | {row['op']} "
            f"{_fmt(row['target'], 2 if row['unit'] == 'ratio' else 1)}{unit} | {met} | {row['basis']} "
            f"| {_fmt(row['baseline_ratio'], 2)} |"
        )
    out.append("")
    out.append("xbaseline: the same figure at scale ÷ on the 1% database (storage), ÷ the steady e2e rate (fan-out).")
    if "echo" in s:
        out += [
            "",
            "## 1. Raw echo (baseline)",
            "",
            "| broker | window | round trips/s | latency p50 / p99 ms | CPU (cores) |",
            "|---|---:|---:|---:|---|",
        ]
        for broker, data in s["echo"].items():
            for key in ("window_64", "window_1"):
                if key in data:
                    d = data[key]
                    cpu = _cpu(d.get("cpu_cores"))
                    out.append(f"| {broker} | {d['window']} | {_fmt(d['per_s'])} | {_lat(d['latency'])} | {cpu} |")
        candidate = _get(s, "echo", "mosquitto-gmqtt", "window_64", "per_s")
        baseline = _get(s, "echo", "mosquitto", "window_64", "per_s")
        if candidate is not None and baseline is not None:
            out += [
                "",
                f"mosquitto-gmqtt is the same echo with the candidate client library gmqtt (not used by the bridge): "
                f"{ratio(candidate, baseline)}x aiomqtt's round trips/s at window 64.",
            ]
    if "e2e" in s:
        out += [
            "",
            "## 2. Bridge end to end (`broker-bridge serve` in its own process)",
            "",
            "| broker | load | executed/s | invoke→receipt p50 / p99 ms | invoke→executed p50 / p99 ms "
            "| invoke→reply p50 / p99 ms | serve CPU per command | CPU (cores) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for broker, data in s["e2e"].items():
            for key, label in (("full", f"full (window {_get(data, 'full', 'window')})"), ("light", "10% (open loop)")):
                d = data.get(key)
                if d:
                    out.append(
                        f"| {broker} | {label} | {_fmt(d.get('per_s'))} | {_lat(d.get('latency_receipt'))} | "
                        f"{_lat(d.get('latency'))} | {_lat(d.get('latency_reply'))} | {_per_command(d)} | "
                        f"{_cpu(d.get('cpu_cores'))} |"
                    )
        rss = ", ".join(f"{b} {_get(d, 'serve_rss_mb', 'peak')} MB" for b, d in s["e2e"].items())
        endpoints = ", ".join(f"{b} {d.get('endpoints')}" for b, d in s["e2e"].items())
        out += ["", f"Endpoints (one connection each): {endpoints}. Peak serve RSS under load: {rss}."]
    storage = s.get("storage")
    if storage:
        out += [
            "",
            "## 3. Storage at scale (`SqliteStore`)",
            "",
            "| database | get p50 / p99 ms | poll | delivery | history worst p99 ms | expire due (s) | bytes/command |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, db in (("at_scale", "db"), ("baseline", "baseline_db")):
            d, info = storage[key], storage[db]
            out.append(
                f"| {info['rows']:,} rows, {info['endpoints']:,} endpoints | {_lat(d['get'])} | {_lat(d['poll'])} | "
                f"{_lat(d['delivery'])} | {_fmt(d['history_worst_p99_ms'], 2)} | {d['expire']['expired']:,} in "
                f"{d['expire']['seconds']} | {_fmt(info['bytes_per_command'])} |"
            )
        hist = storage["at_scale"]["history"]
        backlog = storage.get("serve_rss_backlog_mb", {})
        out += [
            "",
            "History p50 / p99 ms by filter at scale: "
            + "; ".join(f"{name} {_lat(v)}" for name, v in hist.items())
            + ".",
            f"Build: {storage['db']['build_s']} s. serve RSS (embedded broker, idle after start): "
            f"{storage['serve_rss_mb']['max_mb']} MB on the big DB, {storage['serve_rss_empty_db_mb']['max_mb']} MB "
            f"on an empty one; {backlog.get('max_mb')} MB within {backlog.get('settle_s')} s of a start right after "
            f"the expiry test ({backlog.get('events_recovered', 0):,} unpublished events recovered).",
        ]
        ordered = storage.get("creation_order")
        if ordered:
            out.append(
                f"Expiry with the same rows in creation order (what comes due was created together, as after "
                f"an outage): {ordered['expired']:,} in {ordered['seconds']} s."
            )
    fanout = s.get("fanout")
    if fanout:
        out += [
            "",
            "## 4. Fan-out (Mosquitto)",
            "",
            f"{fanout['devices']:,} devices: {fanout['device_model']}. Connected in {fanout['connect_all_s']} s. "
            f"Invokes with a window of {fanout['window']}: all sent {fanout['all_sent_s']} s, all received "
            f"{fanout['all_received_s']} s, all executed {fanout['all_executed_s']} s "
            f"({_fmt(fanout['executed_per_s'])}/s; {fanout['executed']:,} executed, {fanout['errors']} errors). "
            f"CPU: {_cpu(fanout.get('cpu_cores'))}.",
        ]
    profile = s.get("profile")
    if profile:
        out += ["", "## Profile of serve under the e2e full load (py-spy)", ""]
        for broker, p in profile.items():
            cats = "; ".join(f"{c['name']} {c['share']:.0%}" for c in p["categories"][:8])
            tops = "; ".join(f"`{c['name']}` {c['share']:.0%}" for c in p["top_self"][:6])
            out += [
                f"- **{broker}** ({p['samples_active']} active samples, {_fmt(p['load'].get('per_s'))} executed/s "
                f"while profiled): {cats}.",
                f"  Top self: {tops}.",
            ]
    scale_out = s.get("scaleout")
    if scale_out:
        out += [
            "",
            "## 5. Scale-out (Mosquitto; PostgreSQL " + str(scale_out.get("postgres")) + ")",
            "",
            f"Each configuration {scale_out.get('repeats', 1)} time(s), interleaved; the median repetition "
            "(and the median CPU per command); every repetition's executed/s and CPU ms per command in the "
            "last column.",
            "",
            "| database | instances | executed/s | invoke→executed p50 / p99 ms | bridge CPU ms per command "
            "| CPU (cores) | repetitions |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for run in scale_out["runs"]:
            reps = ", ".join(
                f"{_fmt(r['executed_per_s'])}/s {r['bridge_cpu_ms_per_command']} ms" for r in run.get("repetitions", [])
            )
            out.append(
                f"| {run['engine']} | {run['instances']} | {_fmt(run['executed_per_s'])} "
                f"| {_lat(run['latency_ms'].get('latency'))} | {run['bridge_cpu_ms_per_command']} "
                f"| {_cpu(run['cpu_cores'])} | {reps} |"
            )
        big = _get(scale_out, "storage", "at_scale")
        if big:
            hist = "; ".join(f"{k} {v['p99_ms']}" for k, v in big["history"].items())
            out += [
                "",
                f"PostgreSQL storage, {_get(scale_out, 'storage', 'database', 'rows'):,} rows: p99 ms get "
                f"{big['get']['p99_ms']}, poll {big['poll']['p99_ms']}, delivery {big['delivery']['p99_ms']}, "
                f"history {hist}; expire {big['expire']['expired']:,} in {big['expire']['seconds']} s.",
            ]
    if results.get("errors"):
        out += ["", "## Errors", ""] + [f"- {name}: {error}" for name, error in results["errors"].items()]
    return "\n".join(out) + "\n"


# -- PNG --------------------------------------------------------------------------------------------
def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results.get("scenarios", {})
    bars: list[tuple[str, float]] = []
    lat: list[tuple[str, float, float]] = []
    for broker, data in s.get("echo", {}).items():
        for key in ("window_64", "window_1"):
            if key in data:
                label = f"echo\n{broker}\nw{data[key]['window']}"
                bars.append((label, data[key]["per_s"]))
                lat.append((label, data[key]["latency"]["p50_ms"], data[key]["latency"]["p99_ms"]))
    for broker, data in s.get("e2e", {}).items():
        for key, name in (("full", "full"), ("light", "10%")):
            d = data.get(key)
            if d and d.get("count"):
                bars.append((f"e2e {broker}\n{name}", d["per_s"]))
                r = d.get("latency_receipt", {})
                if r.get("count"):
                    lat.append((f"e2e {broker}\n{name}\n→receipt", r["p50_ms"], r["p99_ms"]))
                lat.append((f"e2e {broker}\n{name}\n→executed", d["latency"]["p50_ms"], d["latency"]["p99_ms"]))
    fanout = s.get("fanout")
    if fanout and fanout.get("executed_per_s"):
        bars.append((f"fan-out\n{fanout['devices']}", fanout["executed_per_s"]))
    storage_rows: list[tuple[str, float, float]] = []
    storage = s.get("storage")
    if storage:
        big = storage["at_scale"]
        for op in ("get", "poll", "delivery"):
            storage_rows.append((op, big[op]["p50_ms"], big[op]["p99_ms"]))
        for name, h in big["history"].items():
            storage_rows.append((f"history\n{name}", h["p50_ms"], h["p99_ms"]))

    fig, axes = plt.subplots(3, 1, figsize=(13, 14))
    meta = results["meta"]
    fig.suptitle(f"broker-bridge bench ({meta['mode']}, {meta['started_at']})", fontsize=13)
    ax = axes[0]
    if bars:
        ax.bar(
            [b[0] for b in bars], [b[1] for b in bars], color=["#4c72b0" if "echo" in b[0] else "#dd8452" for b in bars]
        )
        for i, (_, v) in enumerate(bars):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("per second")
    ax.set_title("Throughput: echo round trips/s, bridge executed commands/s")
    ax.tick_params(axis="x", labelsize=7)
    for ax, rows, title in (
        (axes[1], lat, "Latency percentiles (ms, log scale)"),
        (
            axes[2],
            storage_rows,
            f"SqliteStore latency at {_fmt(_get(s, 'storage', 'db', 'rows'))} rows (ms, log scale)",
        ),
    ):
        if rows:
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="p50", color="#55a868")
            ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="p99", color="#c44e52")
            ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=7)
            ax.set_yscale("log")
            ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
