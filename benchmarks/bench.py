"""`python benchmarks/bench.py ARGS` is `ss-mlx bench ARGS` (see benchmarks/README.md)."""

import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
from ss_mlx.bench.bench import main

if __name__ == "__main__":
    main()
