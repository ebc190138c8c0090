"""`sweep.py confirm`: re-run the top finalists and the baseline with new seeds; paired verdict."""

from __future__ import annotations

import argparse

from sweeper.commands.common import (
    add_store_args,
    guarded,
    handle_signals,
    load_search_study,
    print_confirmation,
    urls,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("confirm", help="re-run the top finalists and the baseline with new seeds; paired verdict")
    add_store_args(p)
    p.add_argument("--top-k", type=int, help="finalists to confirm (default: the spec's sweep.confirm.top_k)")
    p.add_argument("--seeds", type=int, help="new seeds per config (default: the spec's sweep.confirm.seeds)")
    p.add_argument("--max-seeds", type=int, help="seeds for configs that look better after --seeds, and the "
                   "baseline (default: the spec's sweep.confirm.max_seeds; at most --seeds: none added)")
    p.add_argument("--trials", type=lambda text: [int(x) for x in text.split(",")], metavar="N,M",
                   help="confirm these trial numbers instead of the top-k")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from critic.config import SpecError
    from sweeper.sweep import Sweep

    study = load_search_study(args)
    storage, tracking = urls(args)
    sweep = Sweep.load(study, tracking, storage)
    spec = sweep.spec
    sweep.resume()
    confirm = spec.cfg.sweep.confirm
    top_k = confirm.top_k if args.top_k is None else args.top_k
    seeds = confirm.seeds if args.seeds is None else args.seeds
    if seeds < 2 or (top_k < 1 and not args.trials and not spec.candidates):
        raise SpecError(f"confirm needs --seeds >= 2 and --top-k >= 1 (or --trials, or sweep.candidates); got "
                        f"seeds={seeds}, top_k={top_k}")
    handle_signals(args.workers > 1)

    def stages() -> dict:
        result = sweep.confirm(top_k, seeds, args.trials, args.workers, not args.no_progress, args.max_seeds)
        sweep.report()  # the study's report, now with the verdict
        return result

    code, result = guarded(stages, sweep)
    if code:
        return code
    print_confirmation(result)
    return 0
