"""Reports: a self-contained HTML page and a markdown summary with figures, for runs and sweeps."""
