"""`python -m gtakit.finetune RECIPE [key=value ...] [--resume] [--quiet]`: the same as `gtakit finetune`, for
`accelerate launch -m gtakit.finetune ...`."""

import argparse
import sys

from gtakit.errors import one_line_errors
from gtakit.finetune import run_recipe


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m gtakit.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="Recipe YAML file or the name of a shipped recipe.")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. train.lr=5e-5.")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    with one_line_errors():
        run_recipe(args.recipe, args.overrides, resume=args.resume, progress=not args.quiet,
                   log=lambda m: print(m, file=sys.stderr))


main(sys.argv[1:])
