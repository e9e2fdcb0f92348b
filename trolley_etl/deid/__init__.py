"""De-identification of a research export (DICOM PS3.15 Annex E), as a step of a run.

`engine` is the step (checks, then one call per received file), `profile` the standard's
table, `actions` what it does to a header, `stream` the file in and out with pixel data
copied as bytes, `keys` the keyed pseudonyms, `gate` the burned-in text gate, `audit` and
`pseudonym_map` what is recorded. Nothing here is imported until a manifest asks for it.
"""
