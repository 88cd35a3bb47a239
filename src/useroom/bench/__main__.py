"""``python -m useroom.bench deadlock ...``, ``python -m useroom.bench hooks ...``,
``python -m useroom.bench watchdog ...``, ``python -m useroom.bench storm ...``,
``python -m useroom.bench scale ...`` and ``python -m useroom.bench soak ...``:
see ``docs/benchmarks.md``.

``python -m useroom.bench _service GROUP_DIR JSON_PATH`` is the in-process
variant's service process, ``python -m useroom.bench _hook_service SPEC``
the hooks benchmark's, ``python -m useroom.bench _storm_handler SPEC`` the
storm benchmark's handler process and ``python -m useroom.bench _scale_host
SPEC`` the scale benchmark's host of the handlers, all started by the
benchmark itself; they are dispatched before anything else is imported, so
the service carries only what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

__all__ = ["main"]


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_service"]:
        from useroom.bench._service import main as service_main

        return service_main(argv[1:])
    if argv[:1] == ["_hook_service"]:
        from useroom.bench._hook_service import main as hook_service_main

        return hook_service_main(argv[1:])
    if argv[:1] == ["_storm_handler"]:
        from useroom.bench._storm_handler import handler_main as storm_handler_main

        return storm_handler_main(argv[1:])
    if argv[:1] == ["_scale_host"]:
        from useroom.bench._scale_host import host_main as scale_host_main

        return scale_host_main(argv[1:])
    if argv[:1] == ["soak"]:
        from useroom.bench._soak import main as soak_main

        return soak_main(argv[1:])
    if argv[:1] == ["scale"]:
        from useroom.bench._scale import main as scale_main

        return scale_main(argv[1:])
    if argv[:1] == ["storm"]:
        from useroom.bench._storm import main as storm_main

        return storm_main(argv[1:])
    if argv[:1] == ["watchdog"]:
        from useroom.bench._watchdog import main as watchdog_main

        return watchdog_main(argv[1:])
    if argv[:1] == ["hooks"]:
        from useroom.bench._hooks import main as hooks_main

        return hooks_main(argv[1:])
    return _deadlock_main(argv, out or sys.stdout, err or sys.stderr)


def _parser() -> argparse.ArgumentParser:
    from useroom.bench._deadlock import DEFAULT_VARIANTS, VARIANTS, Config

    defaults = Config()

    from useroom.bench._sandbox import size_arg as size

    def variants(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        for name in names:
            if name not in VARIANTS:
                raise argparse.ArgumentTypeError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        return names

    parser = argparse.ArgumentParser(prog="python -m useroom.bench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    deadlock = commands.add_parser(
        "deadlock",
        help="the hard case, side by side: kernel killer, naive handler, useroom handler",
        description="Run the hard case (an OOM handled from inside the group) many times for each variant "
                    "and print a table. On cgroup v1 (oom_kill_disable) or v2 (the handlers hold memory.high "
                    "as a wall; no naive and no no-handler variant there); groups are made below this "
                    "process's own memcg.",
    )
    deadlock.add_argument("--episodes", type=int, default=defaults.episodes, metavar="N",
                          help="episodes per variant (default %(default)s)")
    deadlock.add_argument("--naive-episodes", type=int, default=None, metavar="M",
                          help="episodes of the naive and no-handler variants (default min(N, 20): each "
                               "deadlock costs --deadlock-after seconds)")
    deadlock.add_argument("--variants", type=variants, nargs="+", default=None, metavar="NAME",
                          help=f"which of {', '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)}); "
                               "commas also separate")
    deadlock.add_argument("--limit", type=size, default=defaults.limit, help="the group's limit (default 64M)")
    deadlock.add_argument("--workers", type=int, default=defaults.workers, metavar="W",
                          help="worker processes per episode (default %(default)s)")
    deadlock.add_argument("--worker-size", type=size, default=defaults.worker_size,
                          help="memory each worker touches, more than the limit (default 96M)")
    deadlock.add_argument("--reserve", type=size, default=defaults.reserve,
                          help="the useroom handlers' headroom grant, for workers that started after "
                               "the last refresh (default 8M; 0: none)")
    deadlock.add_argument("--deadlock-after", type=float, default=defaults.deadlock_after, metavar="SECONDS",
                          help="an episode still under OOM this long after start is a deadlock "
                               "(default %(default)s)")
    deadlock.add_argument("--block", type=int, default=defaults.block, metavar="K",
                          help="episodes per group and handler process (default %(default)s; naive: 1)")
    deadlock.add_argument("--naive-pick", choices=("first", "largest"), default=defaults.naive_pick,
                          help="the naive handler's victim: first pid not itself (default), or largest RSS")
    deadlock.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    deadlock.add_argument("--plot", metavar="PATH",
                          help="draw each variant's episode times side by side into PATH (.svg or .png); "
                               "needs matplotlib: pip install 'useroom[plot]'")
    deadlock.add_argument("--verbose", action="store_true", help="a progress line per episode on stderr")
    return parser


def _deadlock_main(argv: list[str], out: TextIO, err: TextIO) -> int:
    from useroom.bench._deadlock import Config, check_available, default_variants, run
    from useroom.bench._plot import check_plot, write
    from useroom.bench._report import distributions, machine_facts, render, summarize, to_json
    from useroom.bench._sandbox import BenchError, own_memcg, scratch_kind

    args = _parser().parse_args(argv)
    killer_switch = scratch_kind().killer_switch
    chosen = tuple(dict.fromkeys(name for group in (args.variants or [list(default_variants(killer_switch))])
                                 for name in group))
    try:
        config = Config(
            variants=chosen, episodes=args.episodes,
            naive_episodes=args.naive_episodes if args.naive_episodes is not None else min(args.episodes, 20),
            limit=args.limit, workers=args.workers, worker_size=args.worker_size, reserve=args.reserve,
            deadlock_after=args.deadlock_after, block=args.block, naive_pick=args.naive_pick,
        )
        if args.plot:
            check_plot(args.plot)
        missing = check_available(config.variants, killer_switch)
        if missing:
            print("cannot run the requested variants:", file=err)
            for reason in missing:
                print(f"  {reason}", file=err)
            print("run the others with --variants, e.g. --variants kernel naive", file=err)
            return 2
        memcg = own_memcg()
        result = run(config, machine_facts(config, memcg), progress=err, verbose=args.verbose)
    except BenchError as error:
        print(f"useroom.bench: {error}", file=err)
        return 2
    rows = summarize(result)
    print(render(result, rows), file=out, flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(to_json(result, rows), file, indent=1)
    if args.plot:
        try:
            write(distributions(result), args.plot)
        except OSError as error:
            print(f"useroom.bench: cannot write the plot: {error}", file=err)
            return 1
    if result.interrupted is not None:
        return 128 + result.interrupted
    if result.problems or any(block.problem for block in result.blocks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
