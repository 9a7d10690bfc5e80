"""`verify`: does run B reproduce run A? Two manifests compared step by step (claims X2, X8)."""

from __future__ import annotations

import argparse

from reference.commands.arguments import at_least

NAME = "verify"
HELP = "does run B reproduce run A? compares two manifests (claim X2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="a run directory (or its manifest.json)")
    p.add_argument("run_b", help="another run directory (or its manifest.json)")
    p.add_argument(
        "--rtol",
        type=at_least(0.0, float),
        default=1e-5,
        help="relative tolerance on per-step losses, >= 0 (default 1e-5)",
    )


def run(args: argparse.Namespace) -> int:
    from reference.training import manifest

    verdict = manifest.compare(manifest.load(args.run_a), manifest.load(args.run_b), rtol=args.rtol)
    print(manifest.report(verdict, args.run_a, args.run_b))
    return 0 if verdict.reproduces else 1
