"""The tiered shard cache of a token store: L1 memory (LRU), L2 local disk (Belady), L3 the store.

* L1: decoded shards in memory, least recently used evicted past `memory_bytes`.
* L2: shard files in a local folder, at most `disk_bytes` in all; they survive restarts and are
  checked against the index's sha256 on every read, a corrupt one is deleted and fetched again.
* L3: the store (store.py), local or remote.

Batch i is a pure function of (seed, data, i), so which shards step s needs is known in advance
(`plan(s)`). L2 eviction uses that future: Belady's optimal policy evicts the resident shard whose
next use is furthest ahead, and a fetched shard is not admitted at all when every resident shard is
needed sooner (LRU with a cap below the data set's size refetches everything every epoch).

A background prefetcher fetches, on a pool of threads, the shards of the next `depth` steps into a
staging area; `depth` starts at `prefetch_steps` and then follows the measured time per step and per
fetch (the steps one fetch takes, queueing included, plus two; at most `prefetch_steps`), so once
warm the step does not wait for the store.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from picotron_jax.data.store import TokenStore, sha256
from picotron_jax.errors import UserError

NEVER = math.inf


class ShardCache:
    """Shards of one store by number, through L1 / staging / L2 / L3 (thread-safe)."""

    def __init__(self, store: TokenStore, *, cache_dir: str | Path | None, disk_bytes: int, memory_bytes: int,
                 prefetch_steps: int = 0, plan: Callable[[int], np.ndarray] | None = None, horizon: int = 4096,
                 fetch_threads: int = 16):
        self.store = store
        self.memory_bytes = int(memory_bytes)
        self.prefetch_steps = int(prefetch_steps)
        self.plan = plan
        self.horizon = int(horizon)
        largest = max(store.shard_nbytes(i) for i in range(store.num_shards))
        self.cache_dir = cache_dir
        self.dir: Path | None = None
        self.disk_bytes = int(disk_bytes)
        if cache_dir is not None and self.disk_bytes > 0:
            if self.disk_bytes < largest:
                raise UserError(f"data.cache_bytes = {self.disk_bytes} is smaller than one shard of {store.location!r} "
                                f"({largest} bytes); set data.cache_bytes to at least {largest} (better: many shards), "
                                f"or 0 for no disk cache")
            digest = hashlib.sha256(f"{store.location}\n{store.shards[0].sha256}".encode()).hexdigest()[:16]
            self.dir = Path(cache_dir).expanduser() / "shards" / digest
            _check_writable(self.dir)
        self._lock = threading.Lock()
        self._l1: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._l1_bytes = 0
        self._staged: dict[int, np.ndarray] = {}  # shards the prefetch window needs (fetched or pinned)
        self._keep: dict[int, int] = {}  # staged shard -> last step of the window that reads it
        self._inflight: dict[int, cf.Future] = {}
        self._l2: dict[int, int] = {}  # shard -> bytes on disk
        self._writing: set[int] = set()  # admitted shards whose file is still being written (never evicted)
        if self.dir is not None:
            for f in self.dir.glob("*.bin"):
                i = int(f.stem.split("-")[0])
                if i < store.num_shards and f.name == self._l2_name(i):
                    self._l2[i] = f.stat().st_size
                else:
                    f.unlink(missing_ok=True)
        self._uses: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._planned = 0  # plan computed for steps [.., _planned)
        self.step = 0
        self._done: set[int] = set()  # shards already read in the current step
        self.fetch_threads = int(fetch_threads)
        self._pool = cf.ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="picotron-shards")
        self._last_step_t: float | None = None
        self._step_s = 0.0  # EMA of the time between steps
        self._fetch_s = 0.0  # EMA of one fetch from the store
        self.depth = self.prefetch_steps  # the most until a step and a fetch were timed
        self.stats = {"l1_hits": 0, "prefetch_hits": 0, "l2_hits": 0, "fetches": 0, "bytes_fetched": 0,
                      "corrupt_refetched": 0, "wait_s": 0.0, "evictions": 0}

    # ------------------------------------------------------------------------------ order

    def _l2_name(self, i: int) -> str:
        return f"{i:06d}-{self.store.shards[i].sha256[:16]}.bin"

    def _extend_plan(self, until: int) -> None:
        if self.plan is None:
            return
        while self._planned < until:
            for sh in self.plan(self._planned):
                self._uses[int(sh)].append(self._planned)
            self._planned += 1

    def next_use(self, i: int) -> float:
        """Step of the next read of shard i from now on (NEVER: not within the planned horizon)."""
        uses = self._uses.get(i)
        while uses and uses[0] < self.step:
            uses.popleft()
        if not uses:
            return NEVER
        if uses[0] == self.step and i in self._done:  # read already in this step: its next use counts
            return uses[1] if len(uses) > 1 else NEVER
        return uses[0]

    def at_step(self, step: int) -> None:
        """The reader moved to `step`: advance the known future and schedule the prefetch."""
        now = time.perf_counter()
        with self._lock:
            if step != self.step:
                self._done = set()
                if self._last_step_t is not None and step == self.step + 1:
                    dt = now - self._last_step_t
                    self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt
                self._last_step_t = now
            if step < self.step or step > self._planned:  # a jump (resume, restore): plan from here
                self._uses.clear()
                self._planned = step
            self.step = step
            self._extend_plan(step + max(self.horizon, self.prefetch_steps + 1))
            if not self.prefetch_steps or self.plan is None:
                return
            if self._step_s and self._fetch_s:  # steps that one fetch (latency + queueing) takes, plus two
                per_step = max(1, len(self.plan(step)))
                queueing = per_step * self._fetch_s / self.fetch_threads
                ahead = math.ceil((self._fetch_s + queueing) / self._step_s) + 2
                self.depth = int(min(self.prefetch_steps, max(1, ahead)))
            for sh in [sh for sh, until in self._keep.items() if until < step]:  # left the window
                del self._keep[sh]
                self._staged.pop(sh, None)
            for s in range(step, step + 1 + self.depth):
                for sh in map(int, self.plan(s)):
                    self._keep[sh] = max(self._keep.get(sh, s), s)
                    if sh in self._staged or sh in self._inflight:
                        continue
                    if sh in self._l1:  # pinned for the window: L1 may evict it before it is read
                        self._staged[sh] = self._l1[sh]
                    else:  # this step's too: its reads then run in parallel instead of one by one
                        self._inflight[sh] = self._pool.submit(self._load, sh, True)

    # ------------------------------------------------------------------------------ reading

    def get(self, i: int) -> np.ndarray:
        """Shard i decoded ([tokens] of the store dtype), from the fastest tier holding it."""
        with self._lock:
            self._done.add(i)
            arr = self._l1.get(i)
            if arr is not None:
                self._l1.move_to_end(i)
                self.stats["l1_hits"] += 1
                return arr
            arr = self._staged.get(i)
            if arr is not None:
                self.stats["prefetch_hits"] += 1
                self._remember(i, arr)
                return arr
            fut = self._inflight.get(i)
            if fut is None:
                fut = self._inflight[i] = cf.Future()
                mine = True
            else:
                mine = False
        t0 = time.perf_counter()
        if mine:
            try:
                arr = self._load(i, False)
            except BaseException as exc:
                fut.set_exception(exc)
                with self._lock:
                    self._inflight.pop(i, None)
                raise
            fut.set_result(arr)
        else:
            arr = fut.result()
            with self._lock:
                self.stats["prefetch_hits"] += 1
        with self._lock:
            self.stats["wait_s"] += time.perf_counter() - t0
            self._remember(i, arr)
        return arr

    def _remember(self, i: int, arr: np.ndarray) -> None:
        """Put shard i into L1 (lock held), evicting least recently used shards past memory_bytes."""
        if self.memory_bytes <= 0 or arr.nbytes > self.memory_bytes:
            return
        if i not in self._l1:
            self._l1[i] = arr
            self._l1_bytes += arr.nbytes
        while self._l1_bytes > self.memory_bytes:
            _, old = self._l1.popitem(last=False)
            self._l1_bytes -= old.nbytes

    def _load(self, i: int, staged: bool) -> np.ndarray:
        """Shard i from L2 (verified) or the store; stored into L2 when Belady admits it."""
        data = self._read_l2(i)
        if data is None:
            t0 = time.perf_counter()
            data = self.store.fetch(i)
            dt = time.perf_counter() - t0
            with self._lock:
                self.stats["fetches"] += 1
                self.stats["bytes_fetched"] += len(data)
                self._fetch_s = dt if not self._fetch_s else 0.8 * self._fetch_s + 0.2 * dt
            self._admit(i, data)
        arr = self.store.decode(data)
        with self._lock:
            if staged and i in self._keep:
                self._staged[i] = arr
            self._inflight.pop(i, None)
        return arr

    def _read_l2(self, i: int) -> bytes | None:
        if self.dir is None:
            return None
        with self._lock:
            if i not in self._l2:
                return None
        path = self.dir / self._l2_name(i)
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if len(data) == self.store.shard_nbytes(i) and sha256(data) == self.store.shards[i].sha256:
            with self._lock:
                self.stats["l2_hits"] += 1
            return data
        path.unlink(missing_ok=True)  # corrupt or vanished: never used, fetched again
        with self._lock:
            self._l2.pop(i, None)
            self.stats["corrupt_refetched"] += 1
        return None

    def _admit(self, i: int, data: bytes) -> None:
        """Belady with bypass: evict the resident shard needed furthest ahead while it is needed later than i."""
        if self.dir is None:
            return
        with self._lock:
            need = len(data)
            mine = self.next_use(i)
            victims = []
            used = sum(self._l2.values())
            # a shard still being written by another thread cannot be evicted: its file would appear after the
            # unlink, on disk but uncounted
            resident = sorted((s for s in self._l2 if s not in self._writing), key=lambda s: (self.next_use(s), s),
                              reverse=True)
            for s in resident:
                if used + need <= self.disk_bytes:
                    break
                if self.next_use(s) <= mine:
                    return  # every remaining shard is needed no later than i: keep them, skip i
                victims.append(s)
                used -= self._l2[s]
            if used + need > self.disk_bytes:
                return
            for s in victims:
                (self.dir / self._l2_name(s)).unlink(missing_ok=True)
                del self._l2[s]
                self.stats["evictions"] += 1
            self._l2[i] = need  # reserved before the write, so concurrent admissions respect the limit
            self._writing.add(i)
        path = self.dir / self._l2_name(i)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._l2.pop(i, None)
                self._writing.discard(i)
            raise UserError(f"data.cache_dir: cannot write {path} ({exc.strerror}); free space or set "
                            f"data.cache_dir to a writable folder") from None
        with self._lock:
            self._writing.discard(i)

    # ------------------------------------------------------------------------------ report

    @property
    def disk_used(self) -> int:
        with self._lock:
            return sum(self._l2.values())

    def metrics(self) -> dict[str, float]:
        """Counters for the metrics rows (data/ prefix added by the caller)."""
        with self._lock:
            s = dict(self.stats)
            reads = s["l1_hits"] + s["prefetch_hits"] + s["l2_hits"] + s["fetches"]
            s["hit_rate"] = (reads - s["fetches"]) / reads if reads else 0.0
            s["disk_bytes"] = sum(self._l2.values())
            s["prefetch_depth"] = self.depth
            return s

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"data.cache_dir: the shard cache folder {folder} is not writable ({exc.strerror}); set "
                        f"data.cache_dir to a writable folder") from None
