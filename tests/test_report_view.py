"""Renderers take the report dict as it is now and as issue 12's `cohort` object and
expected counts extend it; absent keys are shown as unknown, never as 0."""

from __future__ import annotations

from trolley_etl.reports.html import render_html
from trolley_etl.reports.markdown import render_markdown
from trolley_etl.reports.view import build_view


def report(**extra: object) -> dict:
    rows = [
        {
            "status": "stored",
            "study_uid": "1.1",
            "series_uid": "1.1.1",
            "sop_instance_uid": f"i{n}",
            "modality": "CT",
            "patient_id": "P1",
            "accession_number": "A1",
            "study_date": "20240105",
            "query_set": "q",
            "size": 10,
            "sha256": "x",
            "run_id": "r1",
            "stored_at": f"2024-02-01T10:00:0{n}.000+00:00",
            "error": "",
        }
        for n in range(3)
    ]
    by_study = {
        "1.1": {
            "instances": 3,
            "bytes": 30,
            "modalities": ["CT"],
            "status": {"stored": 3},
            "patient_id": "P1",
            "accession_number": "A1",
            "study_date": "20240105",
            "query_set": "q",
        }
    }
    return {
        "manifest": {"name": "m"},
        "root": "/r",
        "generated_at": "t",
        "runs": [
            {
                "run_id": "r1",
                "status": "complete",
                "started_at": "2024-02-01T10:00:00+00:00",
                "finished_at": "2024-02-01T10:00:09+00:00",
            }
        ],
        "summary": {
            "instances": 3,
            "bytes": 30,
            "by_status": {"stored": 3},
            "by_modality": {"CT": {"instances": 3, "bytes": 30}},
            "by_study": by_study,
        },
        "instances": rows,
        **extra,
    }


def test_without_a_cohort_object_the_unknown_steps_say_so() -> None:
    view = build_view(report())
    assert dict(view.funnel) == {
        "requested": None,
        "found": None,
        "selected": 1,
        "stored": 1,
        "incomplete": None,
        "failed": 0,
    }
    assert "| unknown | unknown | 1 | 1 | unknown | 0 |" in render_markdown(report())


def test_the_cohort_object_and_expected_counts_fill_the_funnel() -> None:
    cohort = {
        "q": {
            "requested": 4,
            "matched": 3,
            "unmatched": [{"row": 4, "value": "A9"}],
            "studies_found": 3,
            "dropped_by_select": 1,
            "stored": 1,
            "incomplete": 1,
            "failed": 0,
        }
    }
    data = report(cohort=cohort)
    data["summary"]["by_study"]["1.1"]["expected_instances"] = 5
    view = build_view(data)
    assert dict(view.funnel) == {
        "requested": 4,
        "found": 3,
        "selected": 2,
        "stored": 1,
        "incomplete": 1,
        "failed": 0,
    }
    assert view.studies[0].status == "incomplete"  # 3 of the 5 the archive announced
    assert view.unmatched == [("q", 4, "A9")]
    page = render_html(data)
    assert "3 / 5" in page and "A9" in page and 'id="unmatched"' in page
    assert "1 cohort rows matched no study" in render_markdown(data)


def test_an_empty_report_renders() -> None:
    assert "<html" in render_html({}) and "unknown" in render_markdown({})


def test_archive_values_are_escaped() -> None:
    data = report()
    data["summary"]["by_study"]["1.1"]["patient_id"] = "<script>alert(1)</script>"
    page = render_html(data)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
