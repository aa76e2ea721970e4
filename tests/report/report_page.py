"""Rendering a report in headless Chromium, and reading the drawn page back.

Chromium (Debian's ``chromium``, installed by scripts/setup) loads the file with every
network path closed (a proxy on a port nothing listens on, no background fetches), runs
plotly.js, and dumps the DOM once it has drawn. The tests then count what was drawn: the
SVG points, bars, line vertices and shapes, against the data document in the same page.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

from qmig.latency import LATENCY_DIST_BUCKETS

CHROMIUM_TIMEOUT = 120
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MiB
    # Anything the page tried to fetch would go to a port nothing listens on and fail.
    "--proxy-server=127.0.0.1:9",
    "--virtual-time-budget=10000",
]


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> Any:
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, tag: str | None = None, *classes: str, **attrs: str) -> list[Node]:
        """Every descendant (self included) with ``tag``, all of ``classes`` and ``attrs``."""
        return [
            node
            for node in self.walk()
            if (tag is None or node.tag == tag)
            and set(classes) <= node.classes
            and all(node.attrs.get(name) == value for name, value in attrs.items())
        ]

    def one(self, tag: str | None = None, *classes: str, **attrs: str) -> Node:
        found = self.find(tag, *classes, **attrs)
        assert len(found) == 1, (tag, classes, attrs, len(found))
        return found[0]


class _Builder(HTMLParser):
    VOID: ClassVar[set[str]] = {
        "meta",
        "br",
        "img",
        "input",
        "link",
        "hr",
        "col",
        "wbr",
        "source",
        "area",
        "base",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


@dataclass
class Rendered:
    dom: Node
    document: dict[str, Any]  # the report's own data, as the page carries it


def render(chromium: str, page: Path, profile: Path) -> Rendered:
    """The DOM of ``page`` once Chromium has run its scripts."""
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    builder = _Builder()
    builder.feed(done.stdout)
    data = builder.root.one("script", id="qmig-report-data")
    return Rendered(builder.root, json.loads(data.text))


def line_vertices(path_d: str) -> int:
    """Vertices of an SVG line path as plotly writes it (M x,y L x,y L ...)."""
    return path_d.count("L") + path_d.count("M")


def bar_height(path_d: str) -> float:
    """The drawn height of a plotly bar path (M x0,y0 V y1 H x1 V y0 Z); 0 when empty."""
    if "V" not in path_d:
        return 0.0
    start = float(path_d[1:].split("V")[0].split(",")[1])
    top = float(path_d.split("V")[1].split("H")[0])
    return abs(start - top)


def check_drawn(page: Rendered) -> None:
    """What every report must show, checked against its own data document."""
    document, dom = page.document, page.dom
    timeline = dom.one("div", id="timeline")
    for index, series in enumerate(document["series"]):
        trace = timeline.one("g", "trace", "scatter", f"traceseries{index}")
        (line,) = trace.find("path", "js-line")
        assert line_vertices(line.attrs["d"]) == len(series["t"]), series["name"]
    answered = [r for r in document["requests"] if not r["in_flight"]]
    in_flight = [r for r in document["requests"] if r["in_flight"]]
    # (plotly draws no group at all for a trace without points)
    markers = [
        point
        for trace in timeline.find("g", "trace", "scatter", "tracerequests")
        for point in trace.find("path", "point")
    ]
    assert len(markers) == len(answered)
    crosses = [
        point
        for trace in timeline.find("g", "trace", "scatter", "tracerequestsinflight")
        for point in trace.find("path", "point")
    ]
    assert len(crosses) == len(in_flight)
    # One mark per multifd sync point.
    syncs = [
        point
        for trace in timeline.find("g", "trace", "scatter", "tracemultifdsyncs")
        for point in trace.find("path", "point")
    ]
    assert len(syncs) == len(document.get("syncs") or [])
    # One vertical line per migration step, with its label.
    shapes = timeline.one("g", "layer-above").one("g", "shapelayer").find("path")
    assert len(shapes) == len(document["events"])
    labels = [node.text for node in timeline.find("text", "annotation-text")]
    assert labels == [event["name"] for event in document["events"]]
    # Each pause and each recovery has its mark, and each resumed pause its shaded span.
    assert sum(label.startswith("pause ") for label in labels) == len(document["pauses"])
    resumed = [pause for pause in document["pauses"] if pause["resumed_t"] is not None]
    assert sum(label.startswith("resumed ") for label in labels) == len(resumed)
    spans = [
        path
        for layer in timeline.find("g", "layer-below")
        for shapes in layer.find("g", "shapelayer")
        for path in shapes.find("path")
    ]
    assert len(spans) == len(resumed)

    latency = dom.one("div", id="latency")
    bars = latency.one("g", "trace", "bars").find("g", "point")
    assert len(bars) == LATENCY_DIST_BUCKETS
    heights = [bar_height(bar.one("path").attrs["d"]) for bar in bars]
    dist = document["latency"]["dist"]
    assert [height > 0 for height in heights] == [count > 0 for count in dist]
    # Heights are in the order of the counts (the tallest bar is the largest bucket).
    assert heights.index(max(heights)) == dist.index(max(dist))
    percentiles = [k for k in ("p50", "p99", "max") if document["latency"].get(f"{k}_us")]
    assert len(latency.one("g", "layer-above").one("g", "shapelayer").find("path")) == len(
        percentiles
    )

    tables = dom.find("table", "qmig-table")
    assert [table.attrs["data-title"] for table in tables] == [
        table["title"] for table in document["tables"]
    ]
    for drawn, table in zip(tables, document["tables"], strict=True):
        assert len(drawn.one("tbody").find("tr")) == max(1, len(table["rows"]))
    summary = dom.find("pre")[-1].text
    assert summary.strip() and summary.strip() == document["summary_text"].strip()


def no_fetches(page: Path) -> None:
    """Everything inlined: no script, stylesheet or image from anywhere else."""
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "<img" not in text


def multifd_drawn(page: Rendered) -> dict[str, int]:
    """Each multifd channel's line as the page drew it: its legend name (``multifd-<K>``, read
    from the drawn legend) → the vertices of its line (read from the drawn trace)."""
    timeline = page.dom.one("div", id="timeline")
    legend = [node.text for node in timeline.find("text", "legendtext")]
    drawn: dict[str, int] = {}
    for index, series in enumerate(page.document["series"]):
        name = f"{series['name']} (MiB/s)"
        if not series["name"].startswith("multifd-"):
            continue
        assert name in legend, (name, legend)
        trace = timeline.one("g", "trace", "scatter", f"traceseries{index}")
        drawn[series["name"]] = sum(
            line_vertices(line.attrs["d"]) for line in trace.find("path", "js-line")
        )
    assert len(drawn) == sum(text.startswith("multifd-") for text in legend)
    return drawn
