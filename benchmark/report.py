"""The printed report: the speech modes, the stream's ceiling, the ratios against their targets."""

from __future__ import annotations

from typing import Any

from .backlog import RSS_TARGET_MB


def _f(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    s, c = report["settings"], report.get("corpus")
    if c:
        console.print(
            f"[bold]{c['clips']} clips[/], {c['audio_seconds']:.0f}s of audio ({c['min_sec']:.1f}-{c['max_sec']:.1f}s, "
            f"rates {c['sampling_rates']}); whisper {s['whisper_model']} on {s['device']}/{s['compute_type']}, "
            f"beam {s['beam_size']}, batch {s['whisper_batch_size']}; tokenizer {s['tokenizer']}")
    console.print(f"micro-batches of at most {s['batch_max_events']} events / {s['batch_max_bytes'] // (1 << 20)} MiB / "
                  f"{s['batch_linger_ms']} ms, {s['pipeline_depth']} in flight, {s['download_concurrency']} downloads each, "
                  f"{s['cpu_threads']} CPU threads")
    if report.get("modes"):
        table = Table(title="audio-seconds per wall-second (higher is better)")
        for col in ("mode", "files", "audio s", "wall s", "audio s / wall s", "audio s / CPU s", "peak RSS MB",
                    "others' CPU s", "words heard"):
            table.add_column(col, justify="left" if col == "mode" else "right")
        for name, m in report["modes"].items():
            overlap = m.get("word_overlap")
            table.add_row(name, str(m["files"]), f"{m['audio_seconds']:.1f}", f"{m['wall_seconds']:.2f}",
                          f"[bold]{m['throughput']:.2f}[/]", _f(m.get("audio_s_per_cpu_s"), ".2f"),
                          f"{m['peak_rss_mb']:.0f}", f"{m['cpu_seconds'].get('other processes', 0):.1f}",
                          _f(overlap, ".0%"))
        console.print(table)
    for name in ("pipeline", "pipeline-no-prefect"):
        m = report.get("modes", {}).get(name)
        if m:
            d = m["details"]
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in d["stage_seconds"].items())
            console.print(f"{name}: {d['batches']} batches, model busy {d['model_busy_seconds']:.1f}s = "
                          f"{_f(d.get('device_utilisation'), '.0%')} of wall; stages {stages}; "
                          f"(untimed: consumer start to assignment {d['start_to_assignment_s']:.1f}s)")
    for name in ("model-segment", "model-score"):
        per = report.get("modes", {}).get(name, {}).get("details", {}).get("model_audio_s_per_s")
        if per:
            console.print(f"{name}, audio-s/s per model: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
    _print_ceiling(console, report)
    _print_ratios(console, report)
    targets = report.get("targets", {})
    if targets:
        console.print("targets  " + "  ".join(
            f"{k} {t['target']}: {_f(t['measured'], '.3g')}"
            f"{'' if t.get('paired_median') is None else ' (paired ' + format(t['paired_median'], '.3g') + ', per CPU-s ' + _f(t.get('per_cpu_second'), '.3g') + ')'} "
            f"{'[green]met[/]' if t['met'] else '[red]not met[/]' if t['met'] is False else '(not measured)'}"
            for k, t in targets.items()))
    p = report.get("prefect", {})
    pb = p.get("per_batch_pipeline")
    if pb and pb.get("prefect_bookkeeping_per_flow_run_s") is not None:
        console.print(f"Prefect, pipeline: {pb['flow_runs']:g} flow runs, {pb['task_runs']:g} task runs, "
                      f"{pb['prefect_bookkeeping_per_flow_run_s']:.2f}s of bookkeeping per flow run (overlapped with "
                      f"download and decode); {pb['bare_batches']:g} batches ran bare; API start-up "
                      f"{p.get('warm_up_seconds', 0):.1f}s, untimed")
    lat = report.get("latency")
    if lat:
        console.print(f"latency publish -> finalized: p50 {_f(lat['p50_s'], '.2f')}s, p95 {_f(lat['p95_s'], '.2f')}s "
                      f"({lat['rows']}/{lat['events']} events at {lat['rate_per_s']}/s, rolls every {lat['roll_max_seconds']}s)")
    b = report.get("backlog")
    if b:
        small, large, g = b["in_flight_only"], b["backlog"], b.get("growth_from_backlog_mb")
        verdict = "ok" if g is not None and g < RSS_TARGET_MB else "over"
        console.print(
            f"backlog memory, {b['seconds']:g}s each: peak RSS {small['peak_rss_mb']:.0f} MB with {small['events']} events "
            f"(the in-flight batches only), {large['peak_rss_mb']:.0f} MB with {large['events']} -> growth from the backlog "
            f"{_f(g, '+.0f')} MB (target < {RSS_TARGET_MB} MB: {verdict}); over model load ({large['rss_after_model_load_mb']:.0f} MB): "
            f"{small['growth_over_model_load_mb']:+.0f} / {large['growth_over_model_load_mb']:+.0f} MB, of which Whisper's "
            f"own working set at batch {report['settings']['whisper_batch_size']} of 30 s windows is "
            f"{large['model_working_set_peak_mb'] - large['rss_after_model_load_mb']:+.0f} MB; "
            f"{large['records_fetched']} records fetched, {large['rows_written']} rows; "
            f"{_f(large['growth_first_to_second_half_mb'], '+.0f')} MB from the first half's peak to the second's")
    console.print(f"peak RSS {report['peak_rss_mb']:.0f} MB; run took {report['run_seconds']:.0f}s")


def _print_ceiling(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    ceiling = report.get("ceiling") or {}
    if not ceiling:
        return
    cc = report.get("ceiling_corpus", {})
    table = Table(title=f"the stream's ceiling: {cc.get('objects')} objects of {cc.get('seconds_each')}s, no Whisper, "
                        "a tokenizer that costs nothing (events per wall-second, higher is better)")
    for col in ("mode", "events", "wall s", "events / s", "batches", "events / batch", "flow runs / 1000",
                "task runs / 1000", "Prefect s / flow run", "bench CPU s", "broker+S3 CPU s", "Prefect server CPU s",
                "others' CPU s"):
        table.add_column(col, justify="left" if col == "mode" else "right", no_wrap=col == "mode")
    for name, m in ceiling.items():
        d, cpu = m["details"], m["cpu_seconds"]
        pb = d.get("per_batch", {})
        table.add_row(
            name, str(m["files"]), f"{m['wall_seconds']:.2f}", f"[bold]{d['events_per_second']:.0f}[/]",
            _f(d.get("batches"), "d"), _f(d.get("events_per_batch"), ".0f"),
            _f(d.get("flow_runs_per_1000_events"), ".1f"), _f(d.get("task_runs_per_1000_events"), ".1f"),
            _f(pb.get("prefect_bookkeeping_per_flow_run_s"), ".3f"),
            f"{cpu.get('bench process', 0):.1f}", f"{cpu.get('kafka (tansu)', 0) + cpu.get('s3 (moto)', 0):.1f}",
            f"{cpu.get('prefect server', 0):.1f}", f"{cpu.get('other processes', 0):.1f}",
        )
    console.print(table)
    on = ceiling.get("stream-ceiling", {}).get("details", {}).get("per_batch", {})
    if on.get("bare_batches"):
        console.print(f"[red]stream-ceiling: {on['bare_batches']:g} micro-batches ran without Prefect "
                      f"({on['prefect_failures']:g} Prefect failures): its figure is not Prefect's alone[/]")


def _print_ratios(console: Any, report: dict[str, Any]) -> None:
    """Each ratio three ways, side by side: best round of each mode, paired per round (median), per
    CPU-second of our own processes (robust to other work on the machine)."""
    from rich.table import Table

    ratios = report.get("ratios", {})
    if not ratios:
        return
    paired, cpu = report.get("ratios_paired") or {}, report.get("ratios_cpu") or {}
    table = Table(title="ratios (best of rounds; paired: the median of per-round ratios; per CPU-second of our processes)")
    for col in ("ratio", "best of rounds", "paired median", "rounds", "per CPU-second"):
        table.add_column(col, justify="left" if col == "ratio" else "right")
    for k, v in ratios.items():
        p = paired.get(k)
        if v is None and p is None:
            continue
        table.add_row(k, _f(v, ".2f"), _f(p and p["median"], ".2f"),
                      " ".join(f"{r:.2f}" for r in p["rounds"]) if p else "-", _f(cpu.get(k), ".2f"))
    console.print(table)
