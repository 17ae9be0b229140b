"""Usage: python bench.py 'name:key=val,key=val' ... [--reps R] [--k K]
Interleaves variants (A/B/A/B...), plus 2048^2 and 4096^2 matmul peaks each round."""
import sys, time, statistics as st
import jax
from variants_model import Cfg, make_step, init_state, batch, flops_per_token

def parse(spec):
    name, _, kv = spec.partition(':')
    kw = {}
    for item in filter(None, kv.split(',')):
        k, v = item.split('=')
        f = Cfg.__dataclass_fields__[k].type
        kw[k] = (v in ('1', 'True', 'true')) if f in (bool, 'bool') else int(v) if f in (int, 'int') else v
    return name, Cfg(**kw)

if __name__ == '__main__':
    args = sys.argv[1:]
    reps = 5; K = 3
    if '--reps' in args: i = args.index('--reps'); reps = int(args[i+1]); del args[i:i+2]
    if '--k' in args: i = args.index('--k'); K = int(args[i+1]); del args[i:i+2]
    variants = [parse(s) for s in args]
    if __name__ != "__main__": variants = []

    mm = {}
    for s in (2048, 4096):
        a = jax.random.normal(jax.random.PRNGKey(0), (s, s)); b = a + 1
        f = jax.jit(lambda a, b: a @ b); f(a, b).block_until_ready()
        mm[s] = (f, a, b)
    def peak(s):
        f, a, b = mm[s]; best = 1e9
        for _ in range(2 if s == 4096 else 4):
            t = time.perf_counter(); f(a, b).block_until_ready(); best = min(best, time.perf_counter() - t)
        return 2 * s**3 / best / 1e9

    state = {}
    for name, c in variants:
        t0 = time.perf_counter()
        step = make_step(c); p, o = init_state(c); tok, lab = batch(c)
        p, o, loss = step(p, o, tok, lab); loss.block_until_ready()
        p, o, loss = step(p, o, tok, lab); loss.block_until_ready()
        state[name] = [step, p, o, tok, lab, c]
        print(f"compiled {name} in {time.perf_counter()-t0:.1f}s loss={float(loss):.4f}", flush=True)

    times = {n: [] for n, _ in variants}; cpus = {}; peaks = {2048: [], 4096: []}
    for r in range(reps):
        for s in (2048, 4096): peaks[s].append(peak(s))
        order = variants if r % 2 == 0 else variants[::-1]
        for name, _ in order:
            step, p, o, tok, lab, c = state[name]
            t = time.perf_counter(); cp = time.process_time()
            for _ in range(K): p, o, loss = step(p, o, tok, lab)
            loss.block_until_ready()
            times[name].append((time.perf_counter() - t) / K)
            cpus.setdefault(name, []).append((time.process_time() - cp) / K)
            state[name][1:3] = [p, o]
    pk4 = st.median(peaks[4096]); pk2 = st.median(peaks[2048])
    print(f"peak median: 2048^2={pk2:.1f}  4096^2={pk4:.1f} GFLOP/s   (per-round 4096: {[round(x) for x in peaks[4096]]})")
    base = None; n0 = variants[0][0]
    for name, c in variants:
        ts = times[name]; m = st.median(ts); tps = c.B * c.T / m
        gf = tps * flops_per_token(c) / 1e9
        base = base or m
        print(f"{name:28s} step={m*1e3:7.1f}ms (min {min(ts)*1e3:.1f}) tok/s={tps:6.1f} {gf:6.1f} GFLOP/s  MFU4096={gf/pk4*100:5.1f}%  MFU2048={gf/pk2*100:5.1f}%  speedup={base/m:.3f} paired={st.median([a/b for a,b in zip(times[n0], ts)]):.3f} cpu={st.median(cpus[name]):.2f}s cpu_speedup={st.median(cpus[n0])/st.median(cpus[name]):.3f} perRoundMFU4096={st.median([c.B*c.T/t*flops_per_token(c)/1e9/pk for t, pk in zip(ts, peaks[4096])])*100:.1f}% bestRoundMFU4096={max([c.B*c.T/t*flops_per_token(c)/1e9/pk for t, pk in zip(ts, peaks[4096])])*100:.1f}%", flush=True)
