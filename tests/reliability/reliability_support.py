"""Helpers of the reliability suite (the fixtures using them are in conftest.py): tiny-config params with paths in
tmp, working copies whose stage CLIs run as real processes, one Prefect API server for all of them, retrieval
servers (from benchmarks/load_retrieval.py), file snapshots, polling and killing by PID.

Every process started here binds to 127.0.0.1 (torch's TCPStore excepted: see `Work.torchrun`) and is stopped by
its PID (torchrun and its ranks: their process groups) in a `finally` block.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tspo_core.procs import stop_process

REPO = Path(__file__).resolve().parents[2]  # tests/conftest.py (loaded first) sets the offline env

TINY = REPO / "configs" / "tiny.yaml"
PY = sys.executable
PATH_KEYS = {"data_dir": "data", "index_dir": "artifacts/index", "sft_dir": "artifacts/sft", "rl_dir": "artifacts/rl",
             "metrics_dir": "metrics", "eval_dir": "artifacts/eval", "report_dir": "reports"}


def load_benchmark():
    """benchmarks/load_retrieval.py (its server wrapper and load runner), imported by path once."""
    if "load_retrieval" not in sys.modules:
        spec = importlib.util.spec_from_file_location("load_retrieval", REPO / "benchmarks" / "load_retrieval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["load_retrieval"] = module
        spec.loader.exec_module(module)
    return sys.modules["load_retrieval"]


bench = load_benchmark()
RetrievalServer, run_load, free_port = bench.RetrievalServer, bench.run_load, bench.free_port


# ----------------------------------------------------------------------------------------------------------------
# params
# ----------------------------------------------------------------------------------------------------------------
def tiny_params(root: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """configs/tiny.yaml as a dict, every path under `root` (absolute), dotted `overrides` applied."""
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    raw["paths"] = {k: str(root / v) for k, v in PATH_KEYS.items()}
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return raw


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, hidden ones included (keyed by relative path); directories as 'dir'."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        if p.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def diff_snapshots(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = [f"+ {k}" for k in after if k not in before and not k.endswith("/")]
    changes += [f"- {k}" for k in before if k not in after]
    changes += [f"~ {k}" for k in before if k in after and before[k] != after[k]]
    return changes


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary or moved-aside siblings (`.<name>.*.tmp`, `.<name>.old`) under `parent`, recursively."""
    return sorted(p.relative_to(parent).as_posix() for p in parent.rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


# ----------------------------------------------------------------------------------------------------------------
# the Prefect API used by every stage CLI
# ----------------------------------------------------------------------------------------------------------------
class PrefectAPI:
    """One Prefect server (its own PREFECT_HOME under tmp) for all stage CLIs of the session: without it every CLI
    run would start a temporary server of its own (~10 s each on the 2-core test machine). Started in the
    background when first requested, waited for when a CLI first needs it."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.proc: subprocess.Popen | None = None
        self._ready = False
        self.log = home / "server.log"

    @property
    def env(self) -> dict[str, str]:
        return {"PREFECT_HOME": str(self.home), "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}

    @property
    def server_env(self) -> dict[str, str]:  # as Prefect's own temporary server: only the services it needs
        return {**self.env, "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **self.server_env}, stdout=log, stderr=subprocess.STDOUT, cwd=self.home)

    def wait(self, timeout: float = 240.0) -> None:
        import httpx

        if self._ready:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Prefect server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/api/health", timeout=2).status_code == 200:
                    self._ready = True
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Prefect server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# ----------------------------------------------------------------------------------------------------------------
# working copies of the tiny world and their stage CLIs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Work:
    """A working copy of the tiny world in tmp: `params.yaml` (paths inside `root`), stage CLIs run with cwd=root."""

    root: Path
    api: PrefectAPI
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    def path(self, key: str) -> Path:
        return Path(self.raw["paths"][key])

    def set(self, **dotted: Any) -> "Work":
        """Apply dotted overrides (`train__steps=3` or set(**{"train.steps": 3})) and rewrite params.yaml."""
        for k, v in dotted.items():
            set_dotted(self.raw, k.replace("__", "."), v)
        self.write()
        return self

    def write(self) -> Path:
        self.params_path.write_text(yaml.safe_dump(self.raw, sort_keys=False), encoding="utf-8")
        return self.params_path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **self.api.env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        return {**env, **(extra or {})}

    def cmd(self, stage: str, *args: str, params: Path | str | None = None) -> list[str]:
        return [PY, "-m", f"flows.{stage}", "--params", str(params or self.params_path), *args]

    def run(self, stage: str, *args: str, params: Path | str | None = None, needs_prefect: bool = True,
            timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a stage CLI to the end (`needs_prefect=False` when it must fail before any flow run starts)."""
        if needs_prefect:
            self.api.wait()
        return subprocess.run(self.cmd(stage, *args, params=params), cwd=self.root, env=self.env(env),
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, stage: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.api.wait()
        with open(log, "wb") as fh:
            return subprocess.Popen(self.cmd(stage, *args), cwd=self.root, env=self.env(env), stdout=fh,
                                    stderr=subprocess.STDOUT)

    def ranks(self, stage: str, *args: str, log_dir: Path, nproc: int = 2) -> list[subprocess.Popen]:
        """The stage CLI as `nproc` rank processes started directly (the environment torchrun would give them), so
        each rank's own exit status and stderr (`log_dir/rank<r>.log`) can be checked; each in a session of its
        own (stop them with `kill_tree`). The ranks meet through a fresh file store (`TSPO_DIST_INIT_METHOD`):
        no TCP store listens on a port (torch's binds every interface), and gloo's own connections stay on the
        loopback interface."""
        self.api.wait()
        store = log_dir / f"store-{uuid.uuid4().hex}"
        dist_env = {**LOOPBACK_GLOO, "TSPO_DIST_INIT_METHOD": f"file://{store}",
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        procs = []
        for r in range(nproc):
            with open(log_dir / f"rank{r}.log", "wb") as fh:
                procs.append(subprocess.Popen(self.cmd(stage, *args), cwd=self.root,
                                              env=self.env({**dist_env, "RANK": str(r), "LOCAL_RANK": str(r)}),
                                              stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
        return procs


LOOPBACK_GLOO = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
"""gloo's connections between ranks on the loopback interface only; one thread per rank (torchrun's default)."""


def error_text(stderr: str) -> str:
    """What the CLI printed after its final `error: ` (flows.common.main's message for bad input)."""
    at = stderr.rfind("error: ")
    return stderr[at:] if at >= 0 else ""


def kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL by PID (no-op when it already exited), then reap."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (Linux: /proc/<pid>/task/*/children), children first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except OSError:  # the task exited meanwhile
                continue
            found += [k for k in kids if k not in found]
            todo += kids
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie awaiting its reaper has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` (started with `start_new_session=True`) and that of each of its
    descendants (torchrun puts every rank in a session of its own), all at once; then reap `proc`. Only groups
    led by a process this test started, or by one of their descendants, are signalled."""
    groups = []
    for pid in [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []:  # a reaped PID may be reused
        try:
            groups.append(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in dict.fromkeys(groups):
        if group == os.getpgid(0):  # never this test process's own group
            continue
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240.0, interval: float = 0.005,
             what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value; fail if `proc` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, ValueError, KeyError):  # a file being swapped in at that instant
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def without(rows: list[dict], keys: tuple[str, ...] = ("step_s", "rollout_s")) -> list[dict]:
    """Rows with wall-clock fields removed (the only fields two runs of the same seed may differ in)."""
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# retrieval servers
# ----------------------------------------------------------------------------------------------------------------
def dense_index_config() -> dict:
    return {"kind": "dense", "encoder": "all-MiniLM-L6-v2", "device": "cpu", "shard_size": 8, "max_length": 64,
            "batch_size": 8, "probe_size": 8}


def served(index_dir: Path, log_dir: Path, **kw) -> Any:
    """A started `RetrievalServer` (caller stops it in a finally block)."""
    return RetrievalServer(index_dir, log_path=log_dir / f"server-{free_port()}.log", **kw).start()


def deep(x: Any) -> Any:
    return copy.deepcopy(x)
