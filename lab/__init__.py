"""Research tools around TMC (benchmark, op count, probes, experiments); never needed to train or evaluate."""
