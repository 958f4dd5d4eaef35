"""Set the search settings a bundle ships with (its decode.json), in place.

    python -m batch_caption.training.decode_defaults --bundle DIR --beam_size 5 \\
        --length_normalization 1.0 [--forbid_unknown] [--no_repeat_ngram 3] [--max_caption_length 20] \\
        [--num_alternatives 3]
    python -m batch_caption.training.decode_defaults --bundle DIR --clear

The job, the Python API and `load_captioner` search with a bundle's decode.json unless
told otherwise (each of the job's search flags overrides one setting), as a recipe chose
them on a validation split. Settings not given here are DecodeConfig's defaults. The
bundle id changes with them: records say which settings captioned them, and a catalog
re-captions under new ones. Prints the new id.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from batch_caption import cli
from batch_caption.model.config import DecodeConfig, given_search_flags, in_flag_names

PROG = "python -m batch_caption.training.decode_defaults"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="the bundle directory (local or any Beam filesystem)")
    p.add_argument("--clear", action="store_true", help="remove decode.json: the job's own defaults apply")
    cli.add_flags(p, DecodeConfig, unset="{}")
    return p


def run(argv: Sequence[str] | None = None) -> str:
    from batch_caption.model import bundle

    args = build_parser().parse_args(argv)
    if args.clear and given_search_flags(args):
        raise cli.UsageError("--clear takes no search settings")
    try:
        decode = None if args.clear else DecodeConfig().with_flags(args)
    except ValueError as e:
        raise cli.UsageError(in_flag_names(str(e))) from e
    try:
        bundle_id = bundle.set_decode_defaults(args.bundle, decode)
    except bundle.BundleError as e:
        raise cli.UsageError(f"--bundle {args.bundle}: {e}") from e
    print(f"{args.bundle}: bundle {bundle_id}, search defaults "
          f"{'cleared' if decode is None else decode.to_dict()}")
    return bundle_id


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_job(PROG, lambda: run(argv))[0]


if __name__ == "__main__":
    sys.exit(main())
