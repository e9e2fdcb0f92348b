"""The report as one self-contained HTML page for a data steward.

Everything is inline (styles, SVG charts, a few lines of script for sorting and filtering
the study table), so the file can be mailed, archived or opened offline and never fetches
anything. All values from the archive are escaped: a hostile PatientID cannot inject markup.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from trolley_etl.reports import svg
from trolley_etl.reports.view import ReportView, build_view, human_bytes, shown

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left}th{cursor:pointer;background:#f4f4f4;user-select:none}td.num{text-align:right}
.status-stored{color:#1a7f37}.status-failed,.status-missing,.status-changed{color:#b42318}
.status-incomplete,.status-pending{color:#b54708}.charts{display:flex;flex-wrap:wrap;gap:2em}
svg text{font-size:12px;fill:#333}.empty{color:#777}.summary td{border:none}
input{padding:4px;margin:6px 0;width:20em}
"""
_SCRIPT = """
(function(){
  var table=document.getElementById('studies'); if(!table) return;
  var body=table.tBodies[0], filter=document.getElementById('filter');
  var count=document.getElementById('shown');
  function update(){var q=filter.value.toLowerCase(), n=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var hit=r.textContent.toLowerCase().indexOf(q)>=0; r.hidden=!hit; if(hit) n++;});
    count.textContent=n;}
  filter.addEventListener('input',update);
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('data-dir')!=='asc'; th.setAttribute('data-dir',asc?'asc':'desc');
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[i].getAttribute('data-sort')||a.cells[i].textContent;
        var y=b.cells[i].getAttribute('data-sort')||b.cells[i].textContent;
        var nx=parseFloat(x), ny=parseFloat(y);
        var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});});});
  update();
})();
"""


def _cell(value: Any, *, sort: Any = None, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    attrs = f' class="{classes}"' if classes else ""
    if sort is not None:
        attrs += f' data-sort="{escape(str(sort))}"'
    return f"<td{attrs}>{escape(str(value))}</td>"


def _table(headers: list[str], rows: list[str], table_id: str = "") -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _funnel(view: ReportView) -> str:
    cells = "".join(
        f'<tr><th>{escape(label)}</th><td class="num" data-funnel="{escape(label)}">'
        f"{escape(shown(value))}</td></tr>"
        for label, value in view.funnel
    )
    chart = svg.bars("Studies at each step", view.funnel)
    return f'<div class="charts"><table class="summary">{cells}</table>{chart}</div>'


def _studies(view: ReportView) -> str:
    rows = []
    for s in view.studies:
        expected = "" if s.expected_instances is None else f" / {s.expected_instances}"
        rows.append(
            f'<tr data-study="{escape(s.study_uid)}">'
            + _cell(s.accession_number)
            + _cell(s.patient_id)
            + _cell(s.study_date)
            + _cell(", ".join(s.modalities))
            + _cell(s.series, num=True)
            + _cell(f"{s.instances}{expected}", sort=s.instances, num=True)
            + _cell(human_bytes(s.bytes), sort=s.bytes, num=True)
            + _cell(s.status, cls=f"status-{s.status}")
            + _cell(s.query_set)
            + "</tr>"
        )
    headers = [
        "accession",
        "patient ID",
        "date",
        "modalities",
        "series",
        "instances",
        "size",
        "status",
        "query set",
    ]
    return (
        '<input id="filter" type="search" placeholder="filter studies (any column)" '
        'aria-label="filter studies"> <span id="shown"></span> of '
        f"{len(view.studies)} studies shown; click a column to sort"
        + _table(headers, rows, "studies")
    )


def _failures(view: ReportView) -> str:
    if not view.failures:
        return "<p>Nothing failed.</p>"
    rows = [
        "<tr>"
        + _cell(f.accession_number)
        + _cell(f.patient_id)
        + _cell(f.study_uid)
        + _cell(f.what)
        + _cell(f.status, cls=f"status-{f.status}")
        + _cell(f.reason)
        + "</tr>"
        for f in view.failures
    ]
    return _table(
        ["accession", "patient ID", "study", "series / instance", "status", "reason"],
        rows,
        "failures",
    )


def _unmatched(view: ReportView) -> str:
    if not view.unmatched:
        return ""
    rows = [
        "<tr>" + _cell(name) + _cell(row if row is not None else "") + _cell(value) + "</tr>"
        for name, row, value in view.unmatched
    ]
    table = _table(["query set", "cohort row", "value"], rows, "unmatched")
    return f"<h2>Cohort rows that matched no study</h2>{table}"


def _drift(view: ReportView) -> str:
    rows = []
    for run in view.runs:
        drift = run.lock_drift
        if not drift:
            continue
        detail = json.dumps({k: v for k, v in drift.items() if k.endswith("_studies")})
        cells = (
            _cell(run.run_id),
            _cell(drift.get("added", 0), num=True),
            _cell(drift.get("removed", 0), num=True),
            _cell(detail),
        )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    if not rows:
        return "<p>No run compared the archive with a lock file, or nothing drifted.</p>"
    return _table(["run", "added", "removed", "studies"], rows)


def _runs(view: ReportView) -> str:
    rows = [
        "<tr>"
        + _cell(r.run_id)
        + _cell(r.purpose)
        + _cell(r.status, cls=f"status-{r.status}")
        + _cell(r.started_at)
        + _cell(r.finished_at or "-")
        + _cell(len(r.throughput), num=True)
        + _cell(human_bytes(r.throughput[-1][1] if r.throughput else 0))
        + "</tr>"
        for r in view.runs
    ]
    table = _table(
        ["run", "purpose", "status", "started", "finished", "files stored", "bytes stored"],
        rows,
        "runs",
    )
    plots = "".join(
        f"<figure><figcaption>{escape(r.run_id)}</figcaption>"
        f"{svg.line(f'Throughput of {r.run_id}', r.throughput)}</figure>"
        for r in view.runs[-6:]
        if r.throughput
    )
    return table + f'<div class="charts">{plots}</div>'


def render_html(report: dict[str, Any]) -> str:
    view = build_view(report)
    title = f"trolley-etl report: {view.name}"
    facts = (
        f'<p>Status of the last run: <b class="status-{escape(view.status)}" id="status">'
        f'{escape(view.status)}</b>. <span id="total-instances">{view.instances}</span> '
        f"instances, {escape(human_bytes(view.bytes))} in {len(view.studies)} studies under "
        f"<code>{escape(view.root)}</code>. Generated {escape(view.generated_at)}.</p>"
    )
    by_modality = svg.bars("Instances by modality", list(view.by_modality.items()))
    by_month = svg.bars("Studies by month", list(view.by_month.items()))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{facts}"
        f"<h2>Attrition</h2>{_funnel(view)}"
        f'<h2>What was pulled</h2><div class="charts"><figure><figcaption>Instances by modality'
        f"</figcaption>{by_modality}</figure><figure><figcaption>Studies by month"
        f"</figcaption>{by_month}</figure></div>"
        f"<h2>Studies</h2>{_studies(view)}"
        f"<h2>Failures</h2>{_failures(view)}{_unmatched(view)}"
        f"<h2>Lock drift</h2>{_drift(view)}"
        f"<h2>Runs</h2>{_runs(view)}"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
