"""`diffrl sweep FILE.yaml`: a grid of `diffrl train` runs × seeds on Ray Tune, with a results table and plot.

`spec` reads and checks the sweep file, `runner` prepares its models and runs its trials (resuming a folder),
`report` aggregates mean ± std over seeds into results.csv / .md / .png. This package sits above `algos`:
nothing in diffrl below the CLI imports it.
"""

from diffrl.sweep.runner import Outcome, run_sweep
from diffrl.sweep.spec import Sweep, Trial, load_sweep, parse_sweep

__all__ = ["Outcome", "Sweep", "Trial", "load_sweep", "parse_sweep", "run_sweep"]
