"""``levo-data``: data tools (toy world, shard validation, ...).

Subcommands live in :data:`COMMANDS` (name -> :class:`~levo_infer.commands.Command`, the command
table idiom of every levo tool); to add one, write an ``add_arguments(parser)`` and a ``run(args) ->
exit code`` function and add an entry (a module with several commands exports its part of the table).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from levo_data.catalogue import CATALOGUE_COMMANDS
from levo_data.encode import ENCODE_COMMANDS
from levo_data.offline import OFFLINE_COMMANDS
from levo_data.outputs import OutputFolderError, check_output_folder
from levo_data.prefs import PREF_COMMANDS
from levo_infer.commands import Command, add_commands, run_command
from levo_infer.jsonio import dumps as strict_dumps
from levo_infer.tokens import CODE_SIZE
from levo_train.data.pairs import decode_pair, read_ref_logps
from levo_train.data.shards import ShardError, decode_song, iter_raw, resolve_shards, shard_sizes
from levo_train.toy.world import write_toy_dataset


# ---------------------------------------------------------------------------- toy
def _toy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (gets train/, val/, toy_world.json); a folder "
                   "holding other data is refused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=512)
    p.add_argument("--records-per-shard", type=int, default=2000)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def _toy_run(args: argparse.Namespace) -> int:
    try:
        check_output_folder(args.out, "toy", command="toy")
    except OutputFolderError as e:
        print(f"levo-data toy: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = write_toy_dataset(
            args.out,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            records_per_shard=args.records_per_shard,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(strict_dumps({"out": args.out, **summary}, indent=1))
    return 0


# ---------------------------------------------------------------------------- validate
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="song or pair shard directories, .tar files or brace/glob patterns")
    p.add_argument(
        "--code-size", type=int, default=CODE_SIZE, help=f"codes must be in [0, code_size) (default {CODE_SIZE})"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="check every record and report all bad ones (default: stop at the first)",
    )


def _validate_run(args: argparse.Namespace) -> int:
    """Every record decoded and its digest checked, every tar read to its end-of-archive blocks,
    record counts compared with index.json, and a pair folder's ref_logps.json checked. Records
    without a digest (shards written by another tool) are counted as ``unverified`` and reported."""
    report: dict = {"shards": 0, "records": 0, "bad": 0, "verified": 0, "unverified": 0, "per_shard": {}}
    errors: list[str] = []
    try:
        shards = resolve_shards(args.paths)
        for d in dict.fromkeys(os.path.dirname(os.path.abspath(s)) for s in shards):
            if os.path.isfile(os.path.join(d, "ref_logps.json")):
                read_ref_logps(d)  # checks its embedded digest
                report.setdefault("ref_logps", []).append(d)
        expected = shard_sizes(shards)
        report["shards"] = len(shards)
        for shard, n_expected in zip(shards, expected):
            n = 0
            for raw in iter_raw(shard, keep_corrupt=args.all):
                n += 1
                if "__corrupt__" not in raw:  # a corrupted one is counted as bad below
                    report["verified" if raw["__verified__"] else "unverified"] += 1
                try:
                    if "chosen.npy" in raw:  # a pair record
                        decode_pair(raw, code_size=args.code_size, shard=shard)
                    else:
                        decode_song(raw, code_size=args.code_size, shard=shard)
                except ShardError as e:
                    if not args.all:
                        raise
                    report["bad"] += 1
                    errors.append(str(e))
            if n != n_expected:
                err = ShardError(f"holds {n} records, but index.json lists {n_expected}", shard=shard)
                if not args.all:
                    raise err
                errors.append(str(err))
            report["records"] += n
            report["per_shard"][shard] = n
    except (ShardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if errors:
        report["errors"] = errors[:100]
    print(strict_dumps(report, indent=1))
    if report["unverified"]:
        print(f"note: {report['unverified']} of {report['records']} records carry no digest (shards written by "
              "another tool): their bytes could not be verified", file=sys.stderr)
    for e in errors[:100]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


#: name -> subcommand; add new subcommands here.
COMMANDS: dict[str, Command] = {
    "toy": Command("write the toy song world data set (train/ and val/ shards)", _toy_args, _toy_run),
    "validate": Command(
        "validate song or pair shards (schema, record digests, whole tars); print counts or the first error", _validate_args, _validate_run
    ),
    **PREF_COMMANDS,  # preference data: pairs, ref-logps, merge (levo_data.prefs)
    **OFFLINE_COMMANDS,  # offline candidates at scale: sample, score (levo_data.offline)
    **CATALOGUE_COMMANDS,  # catalogue -> training shards: shards (levo_data.catalogue)
    **ENCODE_COMMANDS,  # audio -> token files with the native codec encoder: encode (levo_data.encode)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="levo-data", description="LeVo data tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS, help_as_description=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``levo-data``; returns the exit code."""
    return run_command(COMMANDS, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
