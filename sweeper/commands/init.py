"""`sweep.py init`: create the study, schema and MLflow experiment once, before workers join; or, with
--from-verl, write a spec from the user's verl launch script (sweeper/verl_launch.py, sweeper/verl_import.py).

Both start a sweep: one from a spec, the other from the command the user already runs, so they share the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeper.commands.common import add_store_args, print_warnings, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("init", help="create the study, schema and MLflow experiment once, before workers join; "
                       "or write a spec from your verl launch (--from-verl)")
    p.add_argument("spec", nargs="?", help="experiment spec YAML, e.g. experiments/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one spec value (repeatable), typed like the field")
    add_store_args(p)
    p.add_argument("--new-study", action="store_true", help="start a fresh study when the stored one differs")
    verl = p.add_argument_group("start from your verl launch (writes a spec, creates no study)")
    verl.add_argument("--from-verl", nargs="+", metavar=("SCRIPT_OR_CMDLINE", "ARG"),
                      help="your launch script (or its command line, quoted), then the arguments you run it with "
                           "(its \"$@\")")
    verl.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                      help="a shell variable the script does not set (repeatable; wins over the script's own)")
    verl.add_argument("--entry", metavar="MODULE", help="your fork's entry module (default: verl.trainer.main_ppo "
                      "or main_ppo_v0)")
    verl.add_argument("--verl-version", help="the verl release the launch runs, X.Y or X.Y.Z (default: the "
                      "installed verl's)")
    verl.add_argument("--verl-config", metavar="DIR", help="that release's (or your fork's) trainer/config folder "
                      "(default: the installed verl's)")
    verl.add_argument("--fork-key", action="append", default=[], metavar="OURS=THEIRS",
                      help="one of your fork's critic keys, e.g. loss.t_a=critic.temperature_a (repeatable; the "
                           "temperature keys of experiments/demo_verl.yaml are known)")
    verl.add_argument("-o", "--output", help="the spec to write (default: experiments/<script name>.yaml)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.from_verl:
        return from_verl(args)
    from critic.config import SpecError
    from critic.data import generate_students
    from sweeper.stores import mask, without_password
    from sweeper.study import load_sweep_spec
    from sweeper.sweep import Sweep

    if not args.spec:
        raise SpecError("init needs a spec (e.g. experiments/demo.yaml), or --from-verl YOUR_LAUNCH_SCRIPT")
    spec = load_sweep_spec(args.spec, args.overrides)
    print_warnings(spec.warnings)
    generate_students(spec.cfg)  # once, before any worker's trial reads them (in the shared data.cache_dir)
    storage, tracking = urls(args)
    sweep = Sweep.init(spec, storage, tracking, args.study, args.new_study)
    sweep.end("FINISHED")  # workers set it RUNNING again while they work
    study = sweep.study
    print(f"[sweep] initialised study {study.study_name!r} in {mask(storage)}; join it from any machine with:\n"
          f"  python sweep.py worker --study {study.study_name} --storage '{without_password(storage)[0]}' "
          f"--tracking-uri '{without_password(tracking)[0]}'\n"
          f"(put the database password in $SWEEP_DB_PASSWORD; it is never printed)")
    return 0


def from_verl(args: argparse.Namespace) -> int:
    """Read the launch, compose it with verl's config, write the spec; on any error nothing is written."""
    import re

    from critic.config import SpecError
    from sweeper.study import load_sweep_spec
    from sweeper.verl_import import spec_from_launch
    from sweeper.verl_launch import compose_launch, find_verl_config, load_launch, parse_vars

    script, *script_args = args.from_verl
    stem = Path(script).stem if Path(script).expanduser().is_file() else "verl-launch"
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", stem)
    output = Path(args.output or f"experiments/{name}.yaml")
    if output.exists():
        raise SpecError(f"{output} exists; choose another file with -o, or remove it")
    launch = load_launch(script, script_args, parse_vars(args.var), args.entry)
    source = find_verl_config(args.verl_version, args.verl_config)
    fork_keys = parse_vars_like(args.fork_key)
    imported = spec_from_launch(launch, compose_launch(launch, source), source, fork_keys, f"{name}-critic-warmup")
    spec = load_sweep_spec(str(output), raw=imported.raw)  # the written spec must load as it is
    print_warnings(spec.warnings)
    for line in imported.dead:
        print(f"[sweep] NOT READ BY VERL {imported.verl_version}: {line}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(imported.text())
    print(f"[sweep] wrote {output}: your command's values as sweep.baseline, composed with verl "
          f"{imported.verl_version}'s config; {len(imported.not_modeled)} override(s) left to the RL run and "
          f"{len(imported.notes)} note(s) are comments at its top. Next: python sweep.py run {output}")
    return 0


def parse_vars_like(items: list[str]) -> dict[str, str]:
    """['loss.t_a=critic.temperature_a'] -> {'loss.t_a': 'critic.temperature_a'}."""
    from critic.config import SpecError

    out = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or "." not in ours or not theirs:
            raise SpecError(f"--fork-key expects OURS=THEIRS (e.g. loss.t_a=critic.temperature_a), got {item!r}")
        out[ours.strip()] = theirs.strip().lstrip("+")
    return out
