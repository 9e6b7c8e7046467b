"""Jobs of the training WebUI: trainings, exports and benches run as detached processes.

A job is a directory `WORKSPACE/jobs/<id>/` holding `job.json` (what to run), `log.txt` (stdout and
stderr of every command) and, once it ends, `rc`. A small launcher (`python -m hublab.trainer.webui_jobs
JOBDIR`) runs the job's commands one after another in its own session, so a job goes on when the
browser closes and even when the WebUI stops; stopping a job signals its whole process group
(torchrun and its workers included).

    start(ws, "train", "python", [argv, ...], outputs=[...]) -> Job
    progress(job) -> {"status", "steps": [...], "tok_s", "eta_s", "log": [...], ...}
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# `hublab train expert` progress lines (lora._Progress when stderr is not a terminal)
STEP = re.compile(r"^step (\d+)/(\d+) (.*)$")
KV = re.compile(r"([\w/]+)=([-+0-9.eE]+|nan|inf)")


@dataclass
class Job:
    id: str
    kind: str                      # train, export, package, bench, generate
    name: str
    commands: list[list[str]]
    cwd: str
    started: float = 0.0
    pid: int = 0
    config: dict = field(default_factory=dict)    # what the form held (shown when comparing runs)
    outputs: list[str] = field(default_factory=list)  # workspace-relative paths the job writes

    @property
    def dir(self) -> Path:
        return Path(self.cwd) / "jobs" / self.id


def jobs_dir(ws: Path) -> Path:
    return Path(ws) / "jobs"


def load(ws: Path, job_id: str) -> Job:
    if not ID.match(job_id):
        raise KeyError(job_id)
    path = jobs_dir(ws) / job_id / "job.json"
    if not path.is_file():
        raise KeyError(job_id)
    return Job(**json.loads(path.read_text()))


def all_jobs(ws: Path) -> list[Job]:
    out = []
    for p in sorted(jobs_dir(ws).glob("*/job.json")):
        try:
            out.append(Job(**json.loads(p.read_text())))
        except (ValueError, TypeError):
            continue
    return sorted(out, key=lambda j: j.started, reverse=True)


def new_id(ws: Path, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:40].strip(".-") or "job"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    job_id, n = base, 1
    while (jobs_dir(ws) / job_id).exists():
        n += 1
        job_id = f"{base}-{n}"
    return job_id


def start(ws: Path, kind: str, name: str, commands: list[list[str]], config: dict | None = None,
          outputs: list[str] | None = None, job_id: str | None = None) -> Job:
    """Write the job and start its launcher in a new session; returns at once."""
    ws = Path(ws)
    job = Job(job_id or new_id(ws, name), kind, name, [list(map(str, c)) for c in commands], str(ws),
              time.time(), 0, config or {}, outputs or [])
    job.dir.mkdir(parents=True, exist_ok=False)
    (job.dir / "job.json").write_text(json.dumps(asdict(job), indent=1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(os.devnull, "rb") as null:
        proc = subprocess.Popen([sys.executable, "-m", "hublab.trainer.webui_jobs", str(job.dir)], cwd=ws,
                                stdin=null, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    job.pid = proc.pid
    (job.dir / "job.json").write_text(json.dumps(asdict(job), indent=1))
    _children[job.id] = proc  # reaped by poll() so no zombie stays behind while the WebUI runs
    return job


_children: dict[str, subprocess.Popen] = {}
_first_seen: dict[str, tuple[float, int]] = {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(job: Job) -> str:
    """running, done, failed, stopped, or lost (the launcher died without writing its exit code)."""
    proc = _children.get(job.id)
    if proc is not None:
        proc.poll()
    rc_path = job.dir / "rc"
    if rc_path.exists():
        text = rc_path.read_text().strip()
        if text == "stopped":
            return "stopped"
        return "done" if text == "0" else "failed"
    if proc is not None and proc.returncode is None:
        return "running"
    if proc is None and _alive(job.pid):
        return "running"
    return "stopped" if (job.dir / "stop").exists() else "lost"


def stop(job: Job) -> bool:
    """SIGTERM to the job's process group (the launcher and everything it started)."""
    if status(job) != "running":
        return False
    (job.dir / "stop").write_text(str(time.time()))
    try:
        os.killpg(job.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    # tqdm-style carriage returns: keep what a terminal would show
    return [ln.rsplit("\r", 1)[-1] for ln in data.decode("utf-8", "replace").splitlines()][-lines:]


def parse_log(path: Path) -> dict:
    """Step records, total steps and the result JSON (if printed) from a training log."""
    steps, total, result = [], 0, None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {"steps": [], "total": 0, "result": None}
    for line in text.splitlines():
        m = STEP.match(line.strip())
        if m:
            rec = {"step": int(m.group(1))}
            total = int(m.group(2))
            for k, v in KV.findall(m.group(3)):
                rec[{"tok/s": "tok_s", "eval": "eval_loss"}.get(k, k)] = float(v)
            steps.append(rec)
        elif line.startswith("{") and '"output"' in line:
            try:
                result = json.loads(line)
            except ValueError:
                pass
    return {"steps": steps, "total": total, "result": result}


def progress(job: Job, log_lines: int = 40) -> dict:
    """What the page shows of a job: status, steps so far, tokens/s, ETA, the log tail."""
    st = status(job)
    log = job.dir / "log.txt"
    info = parse_log(log) if job.kind == "train" else {"steps": [], "total": 0, "result": None}
    steps = info["steps"]
    ended = None
    if (job.dir / "rc").exists():
        ended = (job.dir / "rc").stat().st_mtime
    elapsed = (ended or time.time()) - job.started
    eta = None
    if st == "running" and steps and info["total"]:
        # the pace since this WebUI first saw a step of the job (model loading is not a step)
        t0, s0 = _first_seen.setdefault(job.id, (time.time(), steps[-1]["step"]))
        if steps[-1]["step"] > s0:
            per = (time.time() - t0) / (steps[-1]["step"] - s0)
            eta = round(per * (info["total"] - steps[-1]["step"]), 1)
    return {"id": job.id, "kind": job.kind, "name": job.name, "status": st, "started": job.started,
            "elapsed_s": round(elapsed, 1), "commands": job.commands, "config": job.config,
            "outputs": job.outputs, "steps": steps, "total": info["total"], "result": info["result"],
            "tok_s": steps[-1].get("tok_s") if steps else None, "eta_s": eta, "log": tail(log, log_lines)}


# ---------------------------------------------------------------------------------------------------
# The launcher (runs detached: python -m hublab.trainer.webui_jobs JOBDIR)

def launch(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    current: list[subprocess.Popen] = []
    stopping = []

    def on_term(signum, frame):  # the group got SIGTERM too; wait for the command, then record
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    rc = 0
    with open(job_dir / "log.txt", "ab", buffering=0) as log:
        for argv in job["commands"]:
            if stopping:
                break
            log.write(("$ " + " ".join(_quote(a) for a in argv) + "\n").encode())
            try:
                proc = subprocess.Popen(argv, cwd=job["cwd"], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            except OSError as exc:
                log.write(f"cannot start {argv[0]}: {exc}\n".encode())
                rc = 127
                break
            current.append(proc)
            while True:
                try:
                    rc = proc.wait()
                    break
                except InterruptedError:
                    continue
            if rc != 0:
                break
    (job_dir / "rc").write_text("stopped" if stopping else str(rc))
    return rc


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    raise SystemExit(launch(Path(sys.argv[1])))
