"""The report as one HTML file, drawn with plotly and opening offline.

plotly.js is inlined once (``get_plotlyjs``), each figure is a div drawn by it, and the data
document travels in the page as JSON (``#qmig-report-data``), so a reader (or a test) can
check each plot against the data it drew. Nothing is fetched: no CDN, no MathJax, no fonts.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from qmig.errors import QmigError
from qmig.latency import LATENCY_DIST_BUCKETS

TRACE_IDS = {
    "requests": "requests",
    "in_flight": "requestsinflight",
    "dist": "latencydist",
    "syncs": "multifdsyncs",
}
EVENT_COLOURS = {
    "pass": "#888888",
    "switchover": "#d62728",
    "pause": "#ff7f0e",
    "recovery": "#2ca02c",
    "end": "#444444",
}
PERCENTILE_COLOURS = {"p50": "#2ca02c", "p99": "#ff7f0e", "max": "#d62728"}
CONFIG = {"displaylogo": False, "responsive": True}


def require_plotly() -> Any:
    """plotly, or one clear error line saying how to get it (it is an optional extra)."""
    try:
        import plotly
    except ImportError:
        raise QmigError(
            "--report", "needs plotly: pip install 'qmig[report]' (or pip install plotly)"
        ) from None
    return plotly


def write_report(path: Path, document: dict[str, Any]) -> None:
    text = render(document)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise QmigError(str(path), f"cannot write the report: {error.strerror}") from None


def render(document: dict[str, Any]) -> str:
    plotly = require_plotly()
    from plotly.offline import get_plotlyjs

    timeline = _timeline(document).to_html(
        full_html=False, include_plotlyjs=False, div_id="timeline", config=CONFIG
    )
    latency = _latency(document).to_html(
        full_html=False, include_plotlyjs=False, div_id="latency", config=CONFIG
    )
    data = json.dumps(document, separators=(",", ":")).replace("</", "<\\/")
    tables = "\n".join(_table(table) for table in document["tables"])
    title = html.escape(document["title"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="qmig, plotly {html.escape(plotly.__version__)}">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{title}</h1>
<h2>Timeline</h2>
<p>Bytes per second on each channel and direction ({document["bucket_s"] * 1000:g} ms
buckets; each multifd channel its own line, <code>multifd-K</code>), the migration's
steps as vertical lines (postcopy pauses in orange, their recoveries in green, the time
paused shaded between them), multifd sync points as brown triangles, and below, every page
request at the time it was made, with its latency.</p>
{timeline}
<h2>Fault latency</h2>
<p>{html.escape(document["latency"].get("what", ""))}: {document["latency"]["count"]:,}
samples in QEMU's <code>postcopy-latency-dist</code> buckets (bucket N: 2<sup>N</sup> to
2<sup>N+1</sup> µs).</p>
{latency}
{tables}
<h2>Summary</h2>
<pre>{html.escape(document["summary_text"])}</pre>
<script type="application/json" id="qmig-report-data">{data}</script>
</body></html>
"""


def _timeline(document: dict[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.6, 0.4],
        vertical_spacing=0.06,
        specs=[[{"secondary_y": True}], [{}]],
    )
    for index, series in enumerate(document["series"]):
        # The return path carries a few bytes per request: on its own axis (right), or it
        # would lie flat under the stream.
        back = series["name"].startswith("return path")
        figure.add_trace(
            go.Scatter(
                x=series["t"],
                y=series["mib_s"],
                mode="lines",
                name=f"{series['name']} (MiB/s)",
                uid=f"series{index}",
                # Every point drawn (no simplification): the line has one vertex per bucket.
                line={"width": 1, "simplify": False},
            ),
            row=1,
            col=1,
            secondary_y=back,
        )
    syncs = document.get("syncs") or []
    if syncs:
        # Where the channels synced: a mark on the time axis each (one per section at most,
        # too many for lines of their own).
        figure.add_trace(
            go.Scatter(
                x=[sync["t"] for sync in syncs],
                y=[0.0] * len(syncs),
                mode="markers",
                name="multifd sync point",
                uid=TRACE_IDS["syncs"],
                marker={"size": 7, "symbol": "triangle-up", "color": "#8c564b"},
                text=[sync["detail"] for sync in syncs],
            ),
            row=1,
            col=1,
        )
    answered = [r for r in document["requests"] if not r["in_flight"]]
    in_flight = [r for r in document["requests"] if r["in_flight"]]
    figure.add_trace(
        go.Scatter(
            x=[r["t"] for r in answered],
            y=[_ms(r["latency_us"]) for r in answered],
            mode="markers",
            name="page request (latency, ms)",
            uid=TRACE_IDS["requests"],
            marker={"size": 5, "color": "#1f77b4"},
            text=[f"{r['block']} {r['offset']:#x}" for r in answered],
        ),
        row=2,
        col=1,
    )
    if in_flight:
        figure.add_trace(
            go.Scatter(
                x=[r["t"] for r in in_flight],
                y=[0.0] * len(in_flight),
                mode="markers",
                name="page request, page already in flight",
                uid=TRACE_IDS["in_flight"],
                marker={"size": 6, "symbol": "x", "color": "#9467bd"},
                text=[f"{r['block']} {r['offset']:#x}" for r in in_flight],
            ),
            row=2,
            col=1,
        )
    # One line per event across both rows, its label above the plot, staggered over four
    # heights so that steps close together (a switchover takes milliseconds) stay legible.
    for index, event in enumerate(document["events"]):
        colour = EVENT_COLOURS.get(event["kind"], "#d62728")
        figure.add_shape(
            type="line",
            x0=event["t"],
            x1=event["t"],
            xref="x",
            y0=0,
            y1=1,
            yref="paper",
            line={"color": colour, "width": 1, "dash": "dot" if event["kind"] == "pass" else None},
        )
        figure.add_annotation(
            x=event["t"],
            y=1.0 + 0.035 * (index % 4),
            xref="x",
            yref="paper",
            text=html.escape(event["name"]),
            hovertext=html.escape(event.get("detail") or event["name"]),
            showarrow=False,
            font={"size": 10, "color": EVENT_COLOURS.get(event["kind"], "#d62728")},
            yanchor="bottom",
        )
    # Each pause as a shaded span from the break to the resume, under the lines: its two
    # ends are the "pause N" and "resumed N" marks above.
    for pause in document.get("pauses") or []:
        if pause["resumed_t"] is None:
            continue
        figure.add_shape(
            type="rect",
            x0=pause["t"],
            x1=pause["resumed_t"],
            xref="x",
            y0=0,
            y1=1,
            yref="paper",
            layer="below",
            fillcolor=EVENT_COLOURS["pause"],
            opacity=0.25,
            line={"width": 0},
        )
    figure.update_yaxes(title_text="MiB/s", row=1, col=1, rangemode="tozero", secondary_y=False)
    figure.update_yaxes(
        title_text="return path MiB/s", row=1, col=1, rangemode="tozero", secondary_y=True
    )
    figure.update_yaxes(title_text="request latency (ms)", row=2, col=1, rangemode="tozero")
    figure.update_xaxes(title_text="seconds from the start", row=2, col=1)
    figure.update_layout(
        height=620,
        margin={"t": 80, "l": 70, "r": 70, "b": 50},
        legend={"orientation": "h", "y": -0.12},
        template="plotly_white",
    )
    return figure


def _ms(latency_us: float | None) -> float | None:
    return None if latency_us is None else latency_us / 1000


def _bucket_label(index: int) -> str:
    low = 1 << index
    if index == 0:
        return "<2 µs"
    if low >= 1_000_000:
        return f"{low / 1e6:.3g} s"
    if low >= 1000:
        return f"{low / 1000:.3g} ms"
    return f"{low} µs"


def _latency(document: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    latency = document["latency"]
    figure = go.Figure(
        go.Bar(
            x=list(range(LATENCY_DIST_BUCKETS)),
            y=latency["dist"],
            uid=TRACE_IDS["dist"],
            name="faults",
            marker={"color": "#1f77b4"},
        )
    )
    for index, (key, colour) in enumerate(PERCENTILE_COLOURS.items()):
        value = latency.get(f"{key}_us")
        if not value or value <= 0:
            continue
        # A value v in bucket N = [2^N, 2^(N+1)) lies log2(v) - N of the way across bar N.
        position = min(LATENCY_DIST_BUCKETS - 0.5, max(-0.5, math.log2(value) - 0.5))
        figure.add_shape(
            type="line",
            x0=position,
            x1=position,
            y0=0,
            y1=1,
            yref="paper",
            line={"color": colour, "width": 2, "dash": "dash"},
        )
        figure.add_annotation(
            x=position,
            y=1.0 + 0.07 * index,
            yref="paper",
            text=f"{key} {value:,} µs",
            showarrow=False,
            yanchor="bottom",
            font={"color": colour, "size": 11},
        )
    figure.update_xaxes(
        tickmode="array",
        tickvals=list(range(LATENCY_DIST_BUCKETS)),
        ticktext=[_bucket_label(index) for index in range(LATENCY_DIST_BUCKETS)],
        title_text="latency bucket (from)",
    )
    figure.update_yaxes(title_text="count")
    figure.update_layout(
        height=400, margin={"t": 70, "l": 70, "r": 20, "b": 70}, template="plotly_white"
    )
    return figure


def _table(table: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in table["columns"])
    rows = []
    for row in table["rows"]:
        cells = "".join(
            f'<td class="n">{value:,}</td>'
            if isinstance(value, int | float) and not isinstance(value, bool)
            else f"<td>{html.escape('-' if value is None else str(value))}</td>"
            for value in row
        )
        rows.append(f"<tr>{cells}</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(table["columns"])}">none</td></tr>')
    title = html.escape(table["title"])
    return (
        f'<h2>{title}</h2>\n<table class="qmig-table" data-title="{title}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
