"""Preservation probes: scenarios with a known ground truth, selector baselines, metrics, report
(`tsfm-msa probe`, DESIGN.md section 6)."""
