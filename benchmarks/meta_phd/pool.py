"""Pool finished Meta-PHD-style runs over disjoint identities into one table (a replication on new identities, or
more identities than one run holds):

    python -m benchmarks.meta_phd.pool runs/study2 runs/study_rep --out runs/study_pooled

The runs must share every setting but ``protocol.identities`` / ``num_identities``; every interval of the pooled
``table.md`` is over all their identities (seeds averaged first), as in one run.
"""

from __future__ import annotations

import argparse
import sys

from metalora.eval import benchmark


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="workdirs of finished benchmark runs (each with results.json)")
    parser.add_argument("--out", required=True, help="folder for the pooled results.json, table.md and plots")
    args = parser.parse_args(argv)
    try:
        results = benchmark.pool(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:  # a wrong folder or runs that cannot be pooled: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(results["table"])
    print(f"pooled {len(results['identities'])} identities from {len(args.runs)} runs: {args.out}")
    return results


if __name__ == "__main__":
    main()
