"""``python -m maskco.bench`` (``__main__``): where the time goes, against baselines measured in the
same run; ``python -m maskco.bench.micro``: the RoI-pool and loss micro-benchmarks alone."""
