"""`multimae-label CONFIG [key=value ...]`: run the pseudo-labeling job (labeling.job.run) from a YAML config.

Connects to a running Ray cluster (RAY_ADDRESS, `ray job submit`, or a local `ray start --head`) or starts a
local Ray instance when none is running. Exit status: 0 all shards labeled, 1 some shards failed, 2 a usage,
config or data error (one line naming the key or file).
"""

from __future__ import annotations

import argparse
import json
import sys

from shards.format import FormatError

from .config import ConfigError, load_label_config

PROG = "multimae-label"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pseudo-label an RGB shard set with depth / semseg / normals teachers on Ray.",
        epilog="example: multimae-label pipelines/pseudolabel.yaml input=demo_out/data batch_size=8 "
        "teachers.depth.model=Intel/dpt-hybrid-midas",
    )
    parser.add_argument("config", help="YAML file: a Ray cluster config with a metadata: section, or plain settings")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the settings")
    parser.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON here")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_label_config(args.config, args.overrides)
        if args.print_config:
            from shards.config import to_yaml

            print(to_yaml(cfg), end="")
            return 0
        from .job import JobError, format_summary, run

        try:
            summary = run(cfg)
        except JobError as e:  # Ray could not start: not the user's data or config
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"{PROG}: error: config: {e}", file=sys.stderr)
        return 2
    except (FormatError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    return 1 if summary["shards_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
