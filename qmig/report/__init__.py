"""``--report FILE.html``: one self-contained HTML page that shows a migration.

``recorder`` keeps the compact time series a runner produces while it runs, ``document``
turns a command's results into one JSON document (the page's data), and ``html`` draws it
with plotly, inlined, so the page opens offline.
"""
