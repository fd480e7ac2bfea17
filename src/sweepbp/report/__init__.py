"""The sweep's answer from its records alone: summary, tables, words, charts, and `python -m sweepbp.report`
to rebuild it from a tracking store on any machine. Reads through sweepbp.tracking; no torch."""
