"""`sweep.py generate`: make the frozen student's responses once, before a sweep; trials then read the cache."""

from __future__ import annotations

import argparse
import signal
import sys

from sweeper.commands.common import add_spec_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="generate the frozen student's responses for the spec's data files (cached, resumable)",
        description="Generate student responses with student.model (a local causal LM, or demo:actor) or "
                    "student.endpoint (an OpenAI-compatible server) for every data file of the spec that has no "
                    "student column (every file with student.regenerate: true). Responses are cached under "
                    "data.cache_dir/students/; an interrupted run resumes where it stopped; trials reuse the cache.")
    add_spec_args(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from critic.config import SpecError, load_config
    from critic.data import generate_students
    from critic.student import student_source

    cfg = load_config(args.spec, args.overrides)
    if cfg.model.torch_threads > 0:  # the same knob as in trials: on a shared CPU, fewer threads can be faster
        import torch
        torch.set_num_threads(cfg.model.torch_threads)
    if student_source(cfg.student) is None:
        raise SpecError(f"{args.spec}: nothing to generate with; set student.model (a local causal LM directory) "
                        f"or student.endpoint and student.model_name, e.g. --set student.model=/path/to/actor "
                        f"(or student.model=demo:actor, the offline demo's actor)")

    def on_sigterm(signum, frame):  # a scheduler's kill saves what was made, like Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        made = generate_students(cfg, progress=True)
    except KeyboardInterrupt:
        print("\n[generate] interrupted: the responses made so far are saved; rerun the same command to resume.",
              file=sys.stderr)
        return 130
    for name, result in made.items():
        if result is None:
            print(f"[generate] {name}: its file has its own {cfg.data.student_key!r} column, which trials use "
                  f"(student.regenerate: true replaces it)")
        else:
            print(f"[generate] {name}: {result.path}")
    lineage = next((r.lineage for r in made.values() if r is not None), None)
    if lineage:
        print(f"[generate] student: {lineage['source']} {lineage['actor']}, generation {lineage['generation']}")
    return 0
