"""A trial on several GPUs: the sweep worker starts it as a torchrun job and stays the Optuna/MLflow owner.

Parent (the sweep worker, `run_trial_distributed`): writes the trial's resolved config to a private temp
dir, starts `torchrun --nproc-per-node k` on a free rendezvous port (never the fixed 29500, so trials and
sweeps side by side do not collide) in its own process group, and serves rank 0's reports over a Unix socket
in that dir: every `log_train` / `log_eval` goes to the sweep's own reporter (MLflow, Optuna pruning), whose
verdict goes back. Nothing secret crosses: the ranks never see the storage or tracking URLs.
Ranks (`python -m sweeper.launch DIR`, started by torchrun): critic/distributed.py runs the trial; rank 0
sends the TrialResult back; a rank that raises writes `rank<r>.error.json` (type, message, traceback).
A dead or failing rank ends the job (torchrun stops the others; collectives time out after
SWEEP_DIST_TIMEOUT_S); the parent kills the job's process group whatever happens, and raises the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Client, Connection
from pathlib import Path

import torch

from critic.config import ExperimentConfig, SpecError, build_config, to_dict
from critic.reporting import NullReporter, Reporter
from critic.train import NonFiniteError, TrialOutOfMemory
from critic.trial import TrialResult

ROOT = Path(__file__).resolve().parents[1]
SOCKET, CONFIG = "rank0.sock", "config.json"


class RankFailure(RuntimeError):
    """A rank of a multi-GPU trial died or raised; the message names the rank and why."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(n_ranks: int, port: int, trial_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n_ranks),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
            "--monitor-interval", "0.5", "-m", "sweeper.launch", str(trial_dir)]


def run_trial_distributed(cfg: ExperimentConfig, reporter: Reporter, n_ranks: int) -> TrialResult:
    """run_trial's contract on `n_ranks` ranks: same reporter calls, same TrialResult (model not kept)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < n_ranks:
        raise SpecError(f"sweep.gpus_per_trial is {n_ranks} but this process sees {torch.cuda.device_count()} GPUs "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); lower it")
    with tempfile.TemporaryDirectory(prefix="sweep-trial-") as tmp:  # mode 0700: only we reach the socket
        trial_dir = Path(tmp)
        (trial_dir / CONFIG).write_text(json.dumps(to_dict(cfg)))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(trial_dir / SOCKET))
        server.listen(1)
        server.settimeout(0.5)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(trial_dir / "torchrun.log", "wb") as log:
            job = subprocess.Popen(torchrun_command(n_ranks, free_port(), trial_dir), stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            result, stopped_by = _serve(server, job, reporter)
            code = job.wait()
        finally:
            server.close()
            _kill_group(job)
        if stopped_by is not None:  # the sweep's reporter stopped it (e.g. pruned): its own exception
            raise stopped_by
        if result is not None:
            return result
        raise _failure(trial_dir, code)


def _serve(server: socket.socket, job: subprocess.Popen, reporter: Reporter):
    """Answer rank 0 until it sends the result or the job ends: (TrialResult | None, reporter's exception)."""
    conn = None
    while conn is None:
        try:
            conn = Connection(server.accept()[0].detach())
        except socket.timeout:
            if job.poll() is not None:
                return None, None
    result, stopped_by = None, None
    with conn:
        while True:
            if not conn.poll(0.5):
                if job.poll() is not None and not conn.poll(0):
                    return result, stopped_by
                continue
            try:
                kind, step, payload = conn.recv()
            except (EOFError, OSError):
                return result, stopped_by
            if kind == "result":
                return payload, stopped_by
            try:
                if kind == "train":
                    reporter.log_train(step, payload)
                else:  # (metrics, per-pair scores, final)
                    reporter.log_eval(step, *payload)
                conn.send(None)
            except Exception as exc:  # pruned: rank 0 broadcasts the stop; we re-raise this exception
                stopped_by = exc
                conn.send(f"{type(exc).__name__}: {exc}")


def _kill_group(job: subprocess.Popen) -> None:
    """Stop torchrun and every rank (its own process group): SIGTERM, then SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(job.pid, sig)
        except ProcessLookupError:
            return
        try:
            job.wait(timeout=wait_s)
            os.killpg(job.pid, 0)  # ranks may outlive torchrun itself
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _failure(trial_dir: Path, code: int) -> Exception:
    """Why a job ended without a result: the first rank to fail (torchrun's root cause) and its error."""
    records = {record["rank"]: record for record in
               (json.loads(p.read_text()) for p in trial_dir.glob("rank*.error.json"))}
    for record in records.values():  # an error with a meaning for the sweep (OOM retry, non-finite -> pruned)
        if record["type"] == "TrialOutOfMemory":
            return TrialOutOfMemory(f"rank {record['rank']}: {record['message']}")
        if record["type"] == "NonFiniteError":
            return NonFiniteError(**record["fields"])
    log = (trial_dir / "torchrun.log").read_text(errors="replace")
    root = root_cause(log)
    rank, rank_code = root if root else (min(records) if records else None, code)
    if rank in records:
        first = records[rank]
        return RankFailure(f"rank {rank} raised {first['type']}: {first['message']} (torchrun exit code {code})")
    sys.stderr.write(log[-4000:])  # the ranks' own output, for the user
    others = "; ".join(f"then rank {r}: {records[r]['type']}: {records[r]['message'][:200]}" for r in sorted(records))
    return RankFailure(f"rank {rank if rank is not None else '?'} died with exit code {rank_code} and no Python "
                       f"error (killed, out of host memory, or os._exit); torchrun exit code {code}"
                       + (f"; {others}" if others else ""))


def root_cause(log: str) -> tuple[int, int] | None:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" in its output, if it printed one."""
    _, found, tail = log.partition("Root Cause")
    rank, exit_code = re.search(r"rank\s*:\s*(\d+)", tail), re.search(r"exitcode\s*:\s*(-?\d+)", tail)
    return (int(rank.group(1)), int(exit_code.group(1))) if found and rank and exit_code else None


class ParentReporter(Reporter):
    """Rank 0's side of the socket: each call waits for the sweep's verdict (None, or why to stop)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _send(self, kind: str, step: int, payload) -> None:
        self.conn.send((kind, step, payload))
        verdict = self.conn.recv()
        if verdict is not None:
            raise RuntimeError(verdict)

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        self._send("train", step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores=None, final: bool = False) -> None:
        self._send("eval", step, (metrics, pair_scores, final))


class ExitAtStep(Reporter):
    """Test hook (SWEEP_TEST_RANK_EXIT=rank:step:marker_file): that rank dies (os._exit) once, at that step."""

    def __init__(self, spec: str, rank: int) -> None:
        target, step, self.marker = spec.split(":", 2)
        self.armed, self.step = int(target) == rank, int(step)

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        if not (self.armed and step == self.step):
            return
        try:  # created atomically: when two trials reach the step at once, one of them dies, not both
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def _write_error(trial_dir: Path, rank: int, exc: BaseException) -> None:
    fields = {k: getattr(exc, k) for k in ("step", "what", "value")} if isinstance(exc, NonFiniteError) else {}
    record = {"rank": rank, "type": type(exc).__name__, "message": str(exc)[:4000], "fields": fields,
              "traceback": traceback.format_exc()[-8000:]}
    (trial_dir / f"rank{rank}.error.json").write_text(json.dumps(record))


def rank_main(trial_dir: Path) -> int:
    """One rank of the trial (under torchrun)."""
    import torch.distributed as dist

    from critic.distributed import init_distributed, run_sharded_trial
    rank = int(os.environ["RANK"])
    conn = None
    try:
        cfg = build_config(json.loads((trial_dir / CONFIG).read_text()), source="multi-GPU trial config")
        device = init_distributed(float(os.environ.get("SWEEP_DIST_TIMEOUT_S", "600")))
        hook = ExitAtStep(os.environ["SWEEP_TEST_RANK_EXIT"], rank) if os.environ.get("SWEEP_TEST_RANK_EXIT") else None
        if rank == 0:
            conn = Client(str(trial_dir / SOCKET), family="AF_UNIX")
        result = run_sharded_trial(cfg, ParentReporter(conn) if conn else NullReporter(), device, every_rank=hook)
        if conn is not None:
            conn.send(("result", 0, result))
        dist.destroy_process_group()
        return 0
    except BaseException as exc:  # noqa: BLE001  (recorded for the parent, then the rank exits non-zero)
        _write_error(trial_dir, rank, exc)
        traceback.print_exc()
        return 1
    finally:
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(rank_main(Path(sys.argv[1])))
