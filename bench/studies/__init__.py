"""Research studies: what was tried and what it showed (the ranker, persons in human crops, fit on a
house style). `python -m bench all` runs them after the benchmarks; their figures are in the docs."""
