"""FM training of one window under torchrun: the launcher commands, their run, and what the workers report.

`run_torchrun(args, nproc, nnodes) -> Launch` runs ``python -m fm.train ARGS`` as `nproc` DDP processes:
- nnodes == 1: one launcher, ``torchrun --standalone --nproc_per_node=nproc``.
- nnodes > 1: `nnodes` launchers on this machine (node ranks 0 .. nnodes-1, nproc // nnodes workers each)
  meeting at a c10d rendezvous on 127.0.0.1:<free port>, node 0 hosting the store: the multi-node path of
  infra/k8s/fm-train-job.yaml on one host (e.g. to test it). nproc must split evenly over the nodes
  (ValueError otherwise). `$FMX_FM_NNODES` (`nnodes_from_env`) chooses it for the fm_train stage.
- every worker runs ``python -m fm.launch ARGS``: ``fm.train.main(ARGS)``, then one stdout line
  ``fmx-ddp {"rank", "world", "node", "nodes", "local_rank", "local_world"}`` from the environment torchrun gave
  it, and one ``fmx-train {TrainResult fields}`` with what it trained. `Launch.workers` holds the first records,
  so a caller records what ran (world size, node count), not what was asked; `Launch.result` is rank 0's
  TrainResult fields (fm_version, parent, steps, examples, seconds, mean_loss, resumed_at). A launcher that exits non-zero stops the others; RuntimeError names it with its stderr tail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

RECORD = "fmx-ddp "
RESULT = "fmx-train "
NNODES_ENV = "FMX_FM_NNODES"


@dataclass(frozen=True)
class Launch:
    workers: list[dict[str, int]]  # one record per worker, sorted by rank
    seconds: float
    result: dict[str, Any]  # rank 0's fm.train.TrainResult, as its fields

    @property
    def world(self) -> int:
        return len(self.workers)

    @property
    def nodes(self) -> int:
        return len({w["node"] for w in self.workers})


def nnodes_from_env() -> int:
    """$FMX_FM_NNODES (default 1): how many torchrun node launchers an FM training starts on this machine."""
    raw = os.environ.get(NNODES_ENV, "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"${NNODES_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def commands(args: list[str], nproc: int, nnodes: int = 1, port: int | None = None) -> list[list[str]]:
    """The argv of each node's launcher (index = node rank)."""
    if nproc < 1 or nnodes < 1 or nproc % nnodes:
        raise ValueError(f"fm_nproc={nproc} does not split evenly over {nnodes} torchrun node(s) "
                         f"(${NNODES_ENV}); use a multiple of {nnodes}")
    run = [sys.executable, "-m", "torch.distributed.run"]
    worker = ["-m", "fm.launch", *args]
    if nnodes == 1:
        return [[*run, "--standalone", f"--nproc_per_node={nproc}", *worker]]
    endpoint = f"127.0.0.1:{port or _free_port()}"
    rdzv_id = f"fmx-{uuid.uuid4().hex[:12]}"
    return [[*run, f"--nnodes={nnodes}", f"--node-rank={rank}", f"--nproc_per_node={nproc // nnodes}",
             "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
             f"--rdzv-conf=is_host={int(rank == 0)}", "--local-addr=127.0.0.1", "--max-restarts=0", *worker]
            for rank in range(nnodes)]  # fmt: skip


def run_torchrun(args: list[str], nproc: int, nnodes: int = 1, env: dict[str, str] | None = None) -> Launch:
    """Run the launchers of `commands` side by side and wait for all; their worker records (module docstring)."""
    cmds = commands(args, nproc, nnodes)
    env = {**os.environ, **(env or {})}
    if nnodes > 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every node is on this host: gloo talks over loopback
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmx-torchrun-") as tmp:
        outs = [open(os.path.join(tmp, f"node{i}.out"), "w+") for i in range(len(cmds))]
        errs = [open(os.path.join(tmp, f"node{i}.err"), "w+") for i in range(len(cmds))]
        procs = [subprocess.Popen(c, stdout=o, stderr=e, env=env, stdin=subprocess.DEVNULL)
                 for c, o, e in zip(cmds, outs, errs, strict=True)]
        try:
            failed = _wait_all(procs)
        finally:
            for p in procs:
                _stop(p)
        texts = [_read(f) for f in outs]
        if failed is not None:
            node = f" node {failed}" if nnodes > 1 else ""
            raise RuntimeError(f"torchrun{node} failed (exit {procs[failed].returncode}):\n{_read(errs[failed])[-3000:]}")
    lines = [line for t in texts for line in t.splitlines()]
    workers = sorted((_record(line) for line in lines if line.startswith(RECORD)), key=lambda w: w["rank"])
    results = [json.loads(line[len(RESULT):]) for line in lines if line.startswith(RESULT)]
    rank0 = next((r for r in results if r.pop("rank") == 0), None)
    if rank0 is None:
        raise RuntimeError(f"torchrun exited 0 but no rank 0 worker reported a result ({len(results)} results)")
    return Launch(workers, time.perf_counter() - start, rank0)


def _wait_all(procs: list[subprocess.Popen[Any]]) -> int | None:
    """Wait until every launcher exited; the index of the first that failed (the others are then stopped)."""
    while True:
        codes = [p.poll() for p in procs]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                return i
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()  # torchrun forwards SIGTERM to its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read(f: Any) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _record(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(line[len(RECORD):]).items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_record() -> dict[str, int]:
    """What torchrun told this worker: its rank and node, the world size and the node count."""
    get = lambda key, default: int(os.environ.get(key) or default)  # noqa: E731
    return {"rank": get("RANK", 0), "world": get("WORLD_SIZE", 1), "node": get("GROUP_RANK", 0),
            "nodes": get("GROUP_WORLD_SIZE", 1), "local_rank": get("LOCAL_RANK", 0),
            "local_world": get("LOCAL_WORLD_SIZE", 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from fm.train import main as train_main

    res = train_main(argv)
    record = worker_record()
    print(RECORD + json.dumps(record), flush=True)
    print(RESULT + json.dumps({"rank": record["rank"], **asdict(res)}), flush=True)


if __name__ == "__main__":
    main()
