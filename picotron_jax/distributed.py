"""Several processes, one program: `jax.distributed` start-up, and a watchdog that names lost processes.

Multi-controller JAX: every process runs this same program. `jax.distributed.initialize` connects them
through the coordination service that process 0 hosts (a gRPC key-value store with heartbeats and
barriers); afterwards `jax.devices()` lists every process's devices, the mesh spans them all, and XLA's
collectives run over NCCL (GPU), ICI/DCN (TPU) or gloo (CPU). There are no process groups here.

Who the processes are comes from the cluster (SLURM, Open MPI, Cloud TPU pods; Kubernetes and mpi4py when
asked for) or from `distributed.coordinator / num_processes / process_id` (what `picotron-jax launch`
passes). Without either, the run is a single process and nothing here does anything.

Failure handling. A dead or hung process leaves the others waiting in a collective that never ends, so
each process runs a watchdog (two daemon threads) over the coordination service's key-value store:

- every `heartbeat_timeout_s / 5` seconds it writes its heartbeat (a counter, its step, its state) and
  reads everyone else's;
- a process whose heartbeat has not changed for `heartbeat_timeout_s`, a process that reports that it
  failed, or a coordination service that has not answered for `heartbeat_timeout_s` stops this process
  with one message naming the process and exit code 3 (`os._exit`: the main thread may sit inside a
  collective that will never return);
- with `step_timeout_s`, a process that is alive but stuck (hung file system, deadlock) is named by
  comparing the steps the processes reached.

JAX's own heartbeat is set to `2 * heartbeat_timeout_s + 10` as a backstop: its coordination service
aborts every process (a C++ fatal error that names the task) if the watchdog could not run at all, and
it is what stops the others at once when process 0, which hosts the service, dies. (jaxlib 0.10's
`missed_heartbeat_callback` cannot be used instead: handing its absl::Status to Python aborts with
std::bad_cast.)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from picotron_jax.callback import Callback
from picotron_jax.config import DistributedConfig
from picotron_jax.config_checks import validate_distributed
from picotron_jax.errors import UserError

EXIT_PEER_LOST = 3  # exit code of a process stopped because another one was lost, failed or hung
KEY_PREFIX = "picotron_watchdog/"  # heartbeat keys in the coordination service: KEY_PREFIX + process id
LOOPBACK = ("127.", "localhost", "[::1]", "::1")
# called as hook(watchdog, problem) on the watchdog thread before it stops the process (the debugger's hang dumps)
DIE_HOOKS: list[Callable[[Any, str], None]] = []


# ----------------------------------------------------------------------------------- start-up plan


@dataclass(frozen=True)
class InitPlan:
    """Arguments for jax.distributed.initialize; None fields are filled in by JAX's cluster detection."""

    method: str | None  # JAX's cluster_detection_method ("slurm", "ompi", "mpi4py", "deactivate") or None
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: list[int] | None
    source: str  # where the process layout comes from, for the log line


def _cluster_in_env(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(JAX method name, process count) of a scheduler that started this process, if any."""
    if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                  "SLURM_LOCALID")):
        return "slurm", int(environ["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "ompi", int(environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    return None


def _on_cloud_tpu() -> bool:
    try:
        from jax._src import cloud_tpu_init  # set when jax is imported on a Cloud TPU VM

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except Exception:  # noqa: BLE001 - private module moved: no TPU auto-detection
        return False


def plan_init(d: DistributedConfig, environ: Mapping[str, str] | None = None,
              on_cloud_tpu: bool = False) -> InitPlan | None:
    """How to start jax.distributed for this config and environment; None = a single-process run.

    `auto` joins a SLURM step or Open MPI job with more than one task, a Cloud TPU VM (JAX tells pods
    from single hosts), or the explicit `distributed.*` fields. A single-task SLURM job stays a plain
    process that sees all its devices (JAX's SLURM detection would pin it to one GPU).
    """
    validate_distributed(d)
    environ = os.environ if environ is None else environ
    if d.cluster == "off":
        return None
    coordinator = d.coordinator or None
    num_processes = d.num_processes or None
    process_id = d.process_id if d.process_id >= 0 else None
    ids = [int(x) for x in d.local_device_ids.split(",")] if d.local_device_ids.strip() else None
    fields = (coordinator, num_processes, process_id)
    if d.cluster == "auto":
        found = _cluster_in_env(environ)
        if None not in fields:
            return InitPlan("deactivate", coordinator, num_processes, process_id, ids, "distributed.* config")
        if any(f is not None for f in fields):
            if found is None:
                missing = [name for name, f in zip(("coordinator", "num_processes", "process_id"), fields) if f is None]
                raise UserError(
                    f"config fields {', '.join('distributed.' + m for m in missing)} are not set: outside SLURM or "
                    f"Open MPI, a multi-process run needs distributed.coordinator (host:port of process 0), "
                    f"distributed.num_processes and distributed.process_id on every process"
                )
            return InitPlan(found[0], coordinator, num_processes, process_id, ids, f"{found[0]} + distributed.* config")
        if found is not None and found[1] > 1:
            return InitPlan(found[0], None, None, None, ids, found[0])
        if on_cloud_tpu:
            return InitPlan(None, None, None, None, ids, "Cloud TPU")
        return None
    method = {"slurm": "slurm", "ompi": "ompi", "mpi4py": "mpi4py", "k8s": None, "tpu": None}[d.cluster]
    return InitPlan(method, coordinator, num_processes, process_id, ids, d.cluster)


# -------------------------------------------------------------------------------- peer bookkeeping


@dataclass
class _Peer:
    beat: dict | None  # last heartbeat read (None: none yet)
    changed_at: float  # local monotonic time the heartbeat last changed


class PeerTable:
    """What this process knows about the others' heartbeats, and whether to stop. Pure: no threads, no JAX.

    A heartbeat is {"n": counter, "step": last finished step or None, "state": running | done | failed,
    "host", "pid", "error"}. Times are this process's monotonic clock, never compared across hosts.
    """

    def __init__(self, me: int, num_processes: int, timeout_s: float, step_timeout_s: float, now: float,
                 coordinator: str = ""):
        self.me, self.n = me, num_processes
        self.timeout_s, self.step_timeout_s = timeout_s, step_timeout_s
        self.coordinator = coordinator
        self.peers = {p: _Peer(None, now) for p in range(num_processes) if p != me}
        self.last_contact = now
        self.step: int | None = None  # this process's last finished step
        self.step_at = now

    def progress(self, step: int, now: float) -> None:
        self.step, self.step_at = step, now

    def update(self, beats: Mapping[int, dict], now: float) -> None:
        """Heartbeats just read from the coordination service (all processes, this one included)."""
        self.last_contact = now
        for p, beat in beats.items():
            peer = self.peers.get(p)
            if peer is not None and beat != peer.beat:
                peer.beat, peer.changed_at = beat, now

    def _who(self, p: int) -> str:
        beat = self.peers[p].beat if p in self.peers else None
        where = f" (host {beat.get('host')}, pid {beat.get('pid')})" if beat else ""
        return f"process {p} of {self.n}{where}"

    def check(self, now: float) -> str | None:
        """Why this process must stop now, or None."""
        silent = now - self.last_contact
        if silent > self.timeout_s:
            return (f"no answer from the coordination service on process 0 ({self.coordinator or 'coordinator'}) for "
                    f"{silent:.1f} s (distributed.heartbeat_timeout_s = {self.timeout_s:g}): process 0 is hung or "
                    f"gone, or the network between the processes is down")
        for p, peer in sorted(self.peers.items()):
            state = (peer.beat or {}).get("state")
            if state == "failed":
                return f"{self._who(p)} failed: {peer.beat.get('error') or 'see its log'}"
        for p, peer in sorted(self.peers.items()):
            if (peer.beat or {}).get("state") == "done":
                continue
            quiet = now - peer.changed_at
            if quiet > self.timeout_s:
                last = None if peer.beat is None else peer.beat.get("step")
                seen = ("it never sent one" if peer.beat is None else
                        "it was last seen before its first step" if last is None else f"it was last seen at step {last}")
                return (f"{self._who(p)} is lost: no heartbeat for {quiet:.1f} s (distributed.heartbeat_timeout_s = "
                        f"{self.timeout_s:g}); {seen}. Its own log says why (killed, out of memory, hung?)")
        if self.step_timeout_s and self.step is not None and now - self.step_at > self.step_timeout_s:
            steps = {p: (peer.beat or {}).get("step") for p, peer in self.peers.items()}
            steps[self.me] = self.step
            known = {p: s for p, s in steps.items() if s is not None}
            low, high = min(known.values()), max(known.values())
            stuck = sorted(p for p, s in steps.items() if s is None or s == low)
            head = (f"no training step finished for {now - self.step_at:.1f} s (distributed.step_timeout_s = "
                    f"{self.step_timeout_s:g})")
            if low < high or len(stuck) < len(steps):
                names = ", ".join(self._who(p) if p != self.me else f"process {p} (this one)" for p in stuck)
                return f"{head}: {names} stuck at step {low} while others reached step {high}"
            return (f"{head}: every process is stuck after step {low} (a hung collective or file system, or a step "
                    f"or checkpoint save longer than distributed.step_timeout_s)")
        return None


# ------------------------------------------------------------------------------------ the watchdog


class Watchdog:
    """Heartbeats through the coordination service's key-value store, checked on two daemon threads.

    The beat thread does the RPCs (which may block if the service hangs); the monitor thread only
    reads the table, so it notices a hung service too. On a problem: message, tell the others, exit.
    """

    def __init__(self, client: Any, me: int, num_processes: int, timeout_s: float, step_timeout_s: float = 0.0,
                 coordinator: str = "", exit_fn: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.me, self.n = client, me, num_processes
        self.clock, self.exit_fn = clock, exit_fn
        self.interval = max(0.2, min(5.0, timeout_s / 5))
        self.table = PeerTable(me, num_processes, timeout_s, step_timeout_s, clock(), coordinator)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._count = 0
        self._state, self._error = "running", ""
        self._identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._threads = [threading.Thread(target=self._beat_loop, name="picotron-heartbeat", daemon=True),
                         threading.Thread(target=self._monitor_loop, name="picotron-watchdog", daemon=True)]

    # -- the main thread's side
    def start(self) -> "Watchdog":
        for t in self._threads:
            t.start()
        return self

    def progress(self, step: int) -> None:
        with self._lock:
            self.table.progress(step, self.clock())

    def stop(self, state: str = "done", error: str = "") -> None:
        """Stop checking the others and publish this process's final state (done or failed)."""
        self._stop.set()
        self._state, self._error = state, error[:2000]
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2 * self.interval + 1)
        self._publish(timeout_s=2.0)

    # -- threads
    def _beat(self) -> dict:
        with self._lock:
            step = self.table.step
        self._count += 1
        return {"n": self._count, "step": step, "state": self._state, "error": self._error, **self._identity}

    def _publish(self, timeout_s: float | None = None) -> None:
        """Write this process's heartbeat; with a timeout, on a helper thread so a hung service cannot block."""
        value = json.dumps(self._beat())

        def put():
            try:
                self.client.key_value_set(f"{KEY_PREFIX}{self.me}", value, allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the service is gone: nothing left to tell
                pass

        if timeout_s is None:
            put()
            return
        t = threading.Thread(target=put, daemon=True)
        t.start()
        t.join(timeout_s)

    def _read(self) -> dict[int, dict]:
        beats = {}
        for key, value in self.client.key_value_dir_get(KEY_PREFIX):
            try:
                beats[int(key.rsplit("/", 1)[-1])] = json.loads(value)
            except (ValueError, TypeError):
                continue
        return beats

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.key_value_set(f"{KEY_PREFIX}{self.me}", json.dumps(self._beat()), allow_overwrite=True)
                beats = self._read()
            except Exception:  # noqa: BLE001 - service unreachable: the monitor times it out
                beats = None
            if beats is not None:
                with self._lock:
                    self.table.update(beats, self.clock())
            self._stop.wait(self.interval)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                problem = self.table.check(self.clock())
            if problem and not self._stop.is_set():
                self._die(problem)
                return

    def _die(self, problem: str) -> None:
        sys.stdout.flush()
        print(f"error: {problem}. Stopping process {self.me} (exit code {EXIT_PEER_LOST}).", file=sys.stderr,
              flush=True)
        self._stop.set()
        for hook in list(DIE_HOOKS):
            try:
                hook(self, problem)
            except Exception as exc:  # noqa: BLE001 - a failing hook must not keep the process alive
                print(f"warning: {getattr(hook, '__qualname__', hook)} failed: {exc}", file=sys.stderr, flush=True)
        self._state, self._error = "failed", f"stopped because {problem}"
        self._publish(timeout_s=1.0)
        if self.me == 0 and self.n > 2:  # process 0 hosts the service: let the others read why before it goes
            time.sleep(min(2 * self.interval, 5.0))
        self.exit_fn(EXIT_PEER_LOST)


# ---------------------------------------------------------------------------------------- the run


class Cluster:
    """This process's place in the run. A context manager around a command:

    leaving normally publishes "done" and waits for the others (jax.distributed.shutdown, bounded by
    shutdown_timeout_s); leaving with an exception publishes "failed" with the error, so the others stop
    at once with a message that says which process failed and why.
    """

    def __init__(self, process_id: int = 0, num_processes: int = 1, watchdog: Watchdog | None = None,
                 coordinator: str = ""):
        self.process_id, self.num_processes = process_id, num_processes
        self.watchdog, self.coordinator = watchdog, coordinator

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1

    def progress(self, step: int) -> None:
        """Called after each finished step (feeds step_timeout_s and the messages)."""
        if self.watchdog is not None:
            self.watchdog.progress(step)

    def callback(self) -> "WatchdogProgress":
        """The loop callback that reports each finished step to the watchdog."""
        return WatchdogProgress(self)

    def finish(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop("done")
            self.watchdog = None
            import jax

            jax.distributed.shutdown()

    def fail(self, error: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop("failed", error)
            if self.process_id == 0:  # keep the service up a moment so the others read why
                time.sleep(min(2 * self.watchdog.interval, 5.0))
            self.watchdog = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None:
            self.finish()
        elif isinstance(exc, KeyboardInterrupt):
            self.fail("interrupted (Ctrl-C)")
        else:
            self.fail(f"{type(exc).__name__}: {exc}")
        return False


class WatchdogProgress(Callback):
    """Tells the watchdog of every finished step (after the step's checkpoint, if any)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def on_step_end(self, trainer, step, outputs):
        self.cluster.progress(step)


def _bind_address(coordinator: str | None) -> str | None:
    """A loopback coordinator listens on loopback only (JAX's default is every interface)."""
    if coordinator and coordinator.startswith(LOOPBACK):
        return coordinator
    return None


def initialize(d: DistributedConfig, environ: Mapping[str, str] | None = None) -> Cluster:
    """Start jax.distributed if this config/environment asks for several processes; call before any JAX use."""
    plan = plan_init(d, environ, on_cloud_tpu=_on_cloud_tpu())
    if plan is None:
        return Cluster()
    import jax

    from picotron_jax import compat

    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        who = "" if plan.process_id is None else f" {plan.process_id}" + (
            f"/{plan.num_processes}" if plan.num_processes else "")
        # context for JAX's own fatal error should the others not come (it aborts on the init timeout)
        print(f"distributed: process{who} joining the run at {plan.coordinator or 'the coordinator'} "
              f"({plan.source}); waiting up to {d.init_timeout_s} s (distributed.init_timeout_s) for every process",
              file=sys.stderr, flush=True)
        try:
            jax.distributed.initialize(
                coordinator_address=plan.coordinator,
                num_processes=plan.num_processes,
                process_id=plan.process_id,
                local_device_ids=plan.local_device_ids,
                cluster_detection_method=plan.method,
                initialization_timeout=d.init_timeout_s,
                heartbeat_timeout_seconds=2 * d.heartbeat_timeout_s + 10,  # backstop behind the watchdog
                shutdown_timeout_seconds=d.shutdown_timeout_s,
                coordinator_bind_address=_bind_address(plan.coordinator),
            )
        except (ValueError, TypeError) as exc:
            hint = (" (distributed.cluster=k8s needs `pip install 'jax[k8s]'` and a service account that may read "
                    "pods; or set distributed.coordinator, num_processes and process_id, see examples/k8s)"
                    if d.cluster == "k8s" else "")
            raise UserError(f"cannot start the multi-process run ({plan.source}): {exc}{hint}") from None
        except Exception as exc:  # noqa: BLE001 - XlaRuntimeError, e.g. the coordinator's port is taken
            if "must be called before" in str(exc):  # a programming error, not a set-up problem
                raise
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise UserError(
                f"process{who} could not start or join the multi-process run at "
                f"{plan.coordinator or 'the cluster coordinator'} ({plan.source}): {first}; check that every process "
                f"can reach that address and that its port is free"
            ) from None
    state = compat.distributed_state()
    me, n = state.process_id, state.num_processes
    coordinator = state.coordinator_address or plan.coordinator or ""
    watchdog = None
    if n > 1:
        watchdog = Watchdog(state.client, me, n, d.heartbeat_timeout_s, d.step_timeout_s, coordinator).start()
    devices = jax.devices()  # joins every process's devices (topology exchange)
    print(
        f"distributed: process {me}/{n} on {socket.gethostname()} (pid {os.getpid()}): {jax.local_device_count()} "
        f"local {devices[0].platform} device(s), {len(devices)} in total; coordinator {coordinator} ({plan.source})",
        file=sys.stderr, flush=True,
    )
    return Cluster(me, n, watchdog, coordinator)
