"""`sweep.py export`: the best (confirmed) config as a spec (yaml/json) or verl Hydra overrides."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from critic.sections import ExportFormat
from sweeper.commands.common import add_store_args, load_study


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write the best config as a spec (yaml/json) or verl Hydra overrides")
    add_store_args(p)
    p.add_argument("--format", choices=typing.get_args(ExportFormat), default="yaml", help="output format")
    p.add_argument("--trial", type=int, help="export this trial instead of the confirmed winner (or the best)")
    p.add_argument("--allow-unconfirmed", action="store_true",
                   help="no warning on stderr for a trial not confirmed better than the baseline")
    p.add_argument("--verl-version", help="--format verl: verl release whose keys to write, X.Y (default: 0.9)")
    p.add_argument("--verl-worker", choices=["legacy", "engine"],
                   help="--format verl: the critic worker, for its clip key (default: that version's default)")
    p.add_argument("--against", nargs="+", metavar=("SCRIPT", "ARG"),
                   help="--format verl: your verl launch script (and its arguments): print, key by key, what the "
                        "export changes in it, and convert the lr warmup to its trainer mode")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="--against: a shell variable the script does not set (repeatable)")
    p.add_argument("--entry", metavar="MODULE", help="--against: your fork's entry module")
    p.add_argument("--verl-config", metavar="DIR", help="--against: verl's (or your fork's) trainer/config folder "
                   "(default: the installed verl's)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--weights", metavar="DIR", help="also write the trial's trained critic (saved with "
                   "train.save_checkpoint: true) into DIR: the merged critic, and for a LoRA trial DIR/adapter, "
                   "which --format verl points critic.model.lora_adapter_path at")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.export import confirmation_note, pick_trial, render
    from sweeper.study import stored_spec

    study = load_study(args)
    spec = stored_spec(study)
    trial = pick_trial(study, args.trial)
    shown_better, confirmation = confirmation_note(study, trial)
    if not shown_better and not args.allow_unconfirmed:
        for line in confirmation:
            print(f"[sweep] warning: {line}", file=sys.stderr)
    against = read_against(args) if args.against else None
    sync_step = None
    if against is not None:
        from sweeper.verl_import import parameter_sync_step
        sync_step = parameter_sync_step(against[0], against[1])
    weights = str(write_weights(args, study, trial.number, Path(args.weights))) if args.weights else None
    text = render(spec, trial, args.format, args.verl_version, args.verl_worker, confirmation, weights, sync_step)
    if args.output:
        Path(args.output).write_text(text)
        print(f"[sweep] wrote {args.output}")
    else:
        print(text, end="")
    if against is not None:
        from sweeper.verl_export import parse_overrides
        from sweeper.verl_import import launch_diff
        print("\n".join(launch_diff(*against, parse_overrides(text))), file=sys.stderr)
    return 0


def read_against(args: argparse.Namespace):
    """(launch, its composed config, the verl source) of --against; refused unless --format verl."""
    from critic.config import SpecError
    from sweeper.verl_launch import compose_launch, find_verl_config, load_launch, parse_vars

    if args.format != "verl":
        raise SpecError("--against compares verl overrides with your verl command: use it with --format verl")
    script, *script_args = args.against
    launch = load_launch(script, script_args, parse_vars(args.var), args.entry)
    source = find_verl_config(args.verl_version, args.verl_config)
    return launch, compose_launch(launch, source), source


def write_weights(args: argparse.Namespace, study, trial_number: int, target: Path) -> Path:
    """Copy the trial's checkpoint artifact (its own, or the study's best_checkpoint) into `target`; its path."""
    import shutil

    from critic.config import SpecError
    from diagnose.checkpoints import download_checkpoint, trial_candidates
    from sweeper.commands.common import urls
    from sweeper.tracking import Tracker

    target = target.expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SpecError(f"--weights {target} already exists and is not empty; choose a new directory")
    client = Tracker(urls(args)[1]).client  # diagnose/ reads an MLflow client; it imports nothing of sweeper
    local, _ = download_checkpoint(client, trial_candidates(study, trial_number, client), f"trial {trial_number}")
    shutil.copytree(local, target, dirs_exist_ok=True)
    shutil.rmtree(local.parent, ignore_errors=True)  # the download's temporary folder
    print(f"[sweep] wrote trial {trial_number}'s critic to {target}"
          + (" (merged; LoRA adapter in adapter/)" if (target / "adapter").is_dir() else ""), file=sys.stderr)
    return target
