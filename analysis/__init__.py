"""Report-stage analysis: statistics and table importers over run outputs (pandas, numpy, scipy; no Ray)."""
