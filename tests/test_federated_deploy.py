"""Federated pretraining deployed as the README says: a SuperLink and two SuperNodes on 127.0.0.1,
the App run with `flwr run` (a file of its own, so pytest-xdist can run it beside the simulations)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_superlink_and_two_supernodes_on_localhost(two_centers: Path, tmp_path: Path) -> None:
    """The deployment recipe of the README: a SuperLink, one SuperNode per site, `flwr run`."""
    from centerprompt.cli import main

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        pytest.skip("Flower's command-line tools are not beside this Python")
    home = tmp_path / "flwr"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip
    link = _free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\naddress = "127.0.0.1:{link}"\n'
                                      "insecure = true\n")  # fmt: skip
    app, out = tmp_path / "app", tmp_path / "server"
    assert main(["federated", "app", "--app", str(app), "--job", "pretrain", "--out", str(out), "--sites", "2",
                 "--preset", "tiny", "--rounds", "1", "--local-steps", "1"]) == 0  # fmt: skip
    procs = []
    log = (tmp_path / "daemons.log").open("w")
    try:
        procs.append(subprocess.Popen(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                                       "--disable-runtime-dependency-installation"], env=env, cwd=tmp_path,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        for center in ("CHUM", "MDA"):
            procs.append(subprocess.Popen(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                           "--port", str(_free_port()),
                                           "--node-config", f'data-dir="{two_centers}" center="{center}"'],
                                          env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + 240
        submitted = None
        while submitted is None and time.monotonic() < deadline:
            run = subprocess.run(["flwr", "run", str(app), "here", "--format", "json"], env=env, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            if run.returncode == 0 and '"run-id"' in run.stdout:
                submitted = json.loads(run.stdout).get("run-id")
            else:
                time.sleep(1)  # the SuperLink is still starting
        assert submitted is not None, run.stdout + run.stderr
        status = ""
        while time.monotonic() < deadline:
            ls = subprocess.run(["flwr", "ls", "here", "--run-id", str(submitted), "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
            status = json.loads(ls.stdout)["runs"][0]["status"] if ls.returncode == 0 else status
            if status.startswith("finished"):
                break
            time.sleep(2)
        assert status == "finished:completed", (status, (tmp_path / "daemons.log").read_text()[-3000:])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sites"] == 2 and summary["rounds_run"] == 1
        assert (out / "model.safetensors").exists()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert all(p.poll() is not None for p in procs)
    shutil.rmtree(home, ignore_errors=True)
