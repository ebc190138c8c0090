"""What the console shows: data lines per file, one line per trial without a terminal, one-line store errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from benchmarks.servers import PASSWORD, USER, free_port
from critic.data import load_pair_set
from critic.demo import make_demo_frame
from tests.helpers import tiny_config, write_pairs
from tests.sweep_helpers import cli, store_args, tiny_sweep_spec


def test_a_load_names_the_file_its_kept_pairs_and_drops_with_a_warning(tmp_path, tiny_cache_dir, capsys):
    frame = make_demo_frame("train").head(40).reset_index(drop=True)
    frame.loc[:9, "student_response"] = ""  # 10 of 40 rows empty: 25% dropped, over the 5% warning line
    path = write_pairs(tmp_path / "pairs.parquet", frame)
    cfg = tiny_config(path, tiny_cache_dir)
    from critic.model import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(tiny_cache_dir)
    pairs = load_pair_set(str(path), cfg.data, tokenizer, "tiny", "train")
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("[data] ") and "warning" not in x)
    assert str(path) in line and "40 rows read, 30 pairs kept, 10 dropped (10 empty)" in line, err
    assert re.search(r"\d+ prompts and \d+ responses truncated, \d+ identical teacher==student pairs", line)
    assert f"[data] warning: {path}: 10 of 40 rows (25%) dropped (10 empty)" in err
    assert len(pairs) == 30 and pairs.stats["dropped_empty"] == 10.0
    load_pair_set(str(path), cfg.data, tokenizer, "tiny", "train")  # cached in this process: no second line
    assert "[data]" not in capsys.readouterr().err


def test_redirected_sweep_prints_no_bars_and_one_line_per_trial(tmp_path, tiny_cache_dir):
    spec = tiny_sweep_spec(tmp_path, n_pairs=40, extra={"data": {"cache_dir": str(tiny_cache_dir)}})
    out = cli("run", str(spec), "--n-trials", "2", *store_args(tmp_path), cwd=tmp_path,
              fresh=True)  # captured: not a terminal; a new interpreter: library logging is set up on import
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "\r" not in console and "it/s" not in console  # no tqdm frames
    lines = re.findall(r"^\[trial (\d+)\] (COMPLETE|PRUNED|FAIL)\b.* in [\d.]+s", out.stdout, flags=re.M)
    assert sorted(int(n) for n, _ in lines) == [0, 1], out.stdout
    assert "[trial 0] COMPLETE value=" in out.stdout and "(baseline)" in out.stdout
    assert "\n[sweep] pruned 0 of 2\n" in out.stdout  # the pruned fraction and why (the spec's pruner: none)
    for noise in ("INFO mlflow", "Creating initial MLflow database tables", "alembic", "UserWarning",
                  "can be interpreted in multiple ways"):
        assert noise not in console, console
    data_lines = [x for x in out.stderr.splitlines() if x.startswith("[data] ")]  # one per file, not per trial
    assert len(data_lines) == 2 and {"train.parquet", "shifted.parquet"} == {Path(x.split()[1][:-1]).name
                                                                             for x in data_lines}, out.stderr



def assert_one_line_error(out, *fixes: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and PASSWORD not in out.stdout + out.stderr
    for fix in fixes:
        assert fix in lines[0], lines[0]


def test_unreachable_server_is_one_line_naming_the_url_and_the_fix(tmp_path):
    url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/sweeps"
    out = cli("status", "--storage", url, cwd=tmp_path)
    assert_one_line_error(out, f"postgresql://{USER}:***@127.0.0.1", "no database server answers", "start it")
    assert "StorageError" in (tmp_path / "mlruns" / "sweep.log").read_text()  # the traceback went to the log
    debug = cli("--debug", "status", "--storage", url, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and PASSWORD not in debug.stderr


def test_missing_database_names_createdb(postgres, tmp_path):
    out = cli("status", "--storage", postgres.address("no_such_db"), cwd=tmp_path)
    assert_one_line_error(out, "database 'no_such_db' does not exist", "createdb", f"-U {USER} no_such_db")


def test_wrong_password_points_to_the_environment_variable(postgres, tmp_path):
    url = postgres.url("wrong_pw").replace(PASSWORD, "not-the-password")
    out = cli("status", "--storage", url, cwd=tmp_path)
    assert_one_line_error(out, "refused the password", "$SWEEP_DB_PASSWORD")
    assert "not-the-password" not in out.stderr


def test_missing_database_as_tracking_uri_is_one_line_too(postgres, tmp_path):
    spec = tiny_sweep_spec(tmp_path, n_pairs=40)
    out = cli("init", str(spec), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
              "--tracking-uri", postgres.address("no_mlflow_db"), cwd=tmp_path, timeout=120)
    assert_one_line_error(out, "--tracking-uri", "database 'no_mlflow_db' does not exist", "createdb")


@pytest.mark.parametrize("url, fix", [
    (f"postgresql+nosuchdriver://{USER}:{PASSWORD}@127.0.0.1/db", "knows no driver"),
    (f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1/db", "pip install psycopg2-binary"),
])
def test_unknown_or_missing_driver_is_one_line(url, fix, tmp_path):
    if "psycopg2" in url and importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed here")
    assert_one_line_error(cli("status", "--storage", url, cwd=tmp_path), fix)
