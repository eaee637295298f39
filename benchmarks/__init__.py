"""Research instruments over gradsel: each module is a benchmark run from the repository root as
`.venv/bin/python -m benchmarks.NAME` (docs/benchmarks.md, docs/research/). They call gradsel's
library as a user would and never the other way round: nothing in gradsel imports them."""
