"""What people read: the plan table, HTML and Markdown reports, the cohort metadata table.

Renderers take the report dict of `runner.report.build_report` (and tolerate keys it may not
have yet, showing "unknown"), so they never need the archive.
"""
