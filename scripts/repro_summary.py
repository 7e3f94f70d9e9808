"""The end of `make repro`: the report's EM table and the paths of the report, its figures and the plots page.

`python scripts/repro_summary.py --params params.yaml [--plots-page dvc_plots/index.html]` (read-only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

from tspo_core.config import load_params  # noqa: E402
from tspo_core.report import repro_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--plots-page", default="dvc_plots/index.html")
    args = ap.parse_args(argv)
    print(repro_summary(load_params(args.params).paths.report_dir, args.plots_page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
