"""``python -m perf --tune [flags of python -m bitempered.tune]``: the tuner's side-by-side report
(``--report``, heuristic versus tuned launch configs) written into perf's output folder,
``perf/out/<device-slug>/tuning.csv`` and ``tuning.md``, unless ``--report DIR`` is given."""

from __future__ import annotations

from pathlib import Path

from bitempered import tune

from . import measure


def main(argv=None) -> int:
    args = tune.parse_args(argv)
    if args.report is None:
        args.report = Path(__file__).resolve().parent / "out" / measure.device_slug(tune.torch_device(args))
    return tune.run(args)
