"""One-file JAX Llama (bench-32m) with perf knobs. Pure functions over a params pytree."""
import math, functools
from dataclasses import dataclass
import jax, jax.numpy as jnp, optax

@dataclass(frozen=True)
class Cfg:
    V: int = 8192; d: int = 512; F: int = 1408; L: int = 8; H: int = 8; KV: int = 4; T: int = 256; B: int = 8
    layout: str = 'io'        # 'io': W[in,out], y=x@W ; 'oi': W[out,in], y=einsum('btd,fd->btf')
    head_layout: str = 'io'   # 'io': [d,V]; 'oi': [V,d]
    linear: str = 'plain'     # 'plain' | 'vjp' (custom_vjp with explicit dW orientation)
    vjp_dw: str = 'native'    # for linear='vjp': 'native' (dW computed in storage layout) | 'flip' (computed transposed then .T)
    ce: str = 'logsoftmax'    # 'logsoftmax' | 'lse_take' | 'lse_onehot' | 'vjp' | 'vjp_chunk'
    ce_chunks: int = 4
    attn: str = 'einsum'      # 'einsum' | 'dpa' | 'repeat' | 'vjp'
    unroll: int = 1           # scan unroll; 0 => python loop
    fuse_qkv: bool = False
    fuse_gu: bool = False
    remat: bool = False
    xopts: str = ''           # per-compile XLA debug options: 'name~value;name~value'
    @property
    def hd(self): return self.d // self.H

def n_params_noembed(c):
    per = c.d*c.d*2 + 2*c.d*c.KV*c.hd + 3*c.d*c.F + 2*c.d
    return c.L*per + c.d*c.V + c.d

def flops_per_token(c):
    return 6*n_params_noembed(c) + 6*c.L*c.T*c.d

def _w(key, din, dout, layout, L=None, scale=0.02):
    shp = (din, dout) if layout == 'io' else (dout, din)
    if L is not None: shp = (L,) + shp
    return scale * jax.random.normal(key, shp, jnp.float32)

def init_params(c, key):
    ks = jax.random.split(key, 12)
    L, d, hd = c.L, c.d, c.hd
    lay = {}
    if c.fuse_qkv:
        lay['wqkv'] = _w(ks[0], d, (c.H + 2*c.KV)*hd, c.layout, L)
    else:
        lay['wq'] = _w(ks[0], d, c.H*hd, c.layout, L)
        lay['wk'] = _w(ks[1], d, c.KV*hd, c.layout, L)
        lay['wv'] = _w(ks[2], d, c.KV*hd, c.layout, L)
    lay['wo'] = _w(ks[3], c.H*hd, d, c.layout, L)
    if c.fuse_gu:
        lay['wgu'] = _w(ks[4], d, 2*c.F, c.layout, L)
    else:
        lay['wg'] = _w(ks[4], d, c.F, c.layout, L)
        lay['wu'] = _w(ks[5], d, c.F, c.layout, L)
    lay['wd'] = _w(ks[6], c.F, d, c.layout, L)
    lay['n1'] = jnp.ones((L, d)); lay['n2'] = jnp.ones((L, d))
    return dict(embed=_w(ks[7], c.V, d, 'io'), layers=lay, norm=jnp.ones((d,)),
                head=_w(ks[8], d, c.V, c.head_layout))

# ---------------- linear ----------------
def _fwd_eq(layout): return 'btd,df->btf' if layout == 'io' else 'btd,fd->btf'

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear_vjp(x, w, layout, dwmode):
    return jnp.einsum(_fwd_eq(layout), x, w)
def _lin_fwd(x, w, layout, dwmode):
    return jnp.einsum(_fwd_eq(layout), x, w), (x, w)
def _lin_bwd(layout, dwmode, res, dy):
    x, w = res
    if layout == 'io':
        dx = jnp.einsum('btf,df->btd', dy, w)
        dw = jnp.einsum('btd,btf->df', x, dy) if dwmode == 'native' else jnp.einsum('btf,btd->fd', dy, x).T
    else:
        dx = jnp.einsum('btf,fd->btd', dy, w)
        dw = jnp.einsum('btf,btd->fd', dy, x) if dwmode == 'native' else jnp.einsum('btd,btf->df', x, dy).T
    return dx, dw
linear_vjp.defvjp(_lin_fwd, _lin_bwd)

def linear(c, x, w, layout=None):
    layout = layout or c.layout
    if c.linear == 'vjp': return linear_vjp(x, w, layout, c.vjp_dw)
    return jnp.einsum(_fwd_eq(layout), x, w)

# ---------------- pieces ----------------
def rmsnorm(x, g, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x*x, -1, keepdims=True) + eps) * g

def rope_tables(c):
    inv = 1.0 / (10000.0 ** (jnp.arange(0, c.hd, 2, dtype=jnp.float32) / c.hd))
    ang = jnp.arange(c.T, dtype=jnp.float32)[:, None] * inv[None]
    return jnp.cos(ang), jnp.sin(ang)     # [T, hd/2]

def apply_rope(x, cos, sin):  # x [B,T,N,hd]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    cos = cos[None, :, None, :]; sin = sin[None, :, None, :]
    return jnp.concatenate([x1*cos - x2*sin, x1*sin + x2*cos], -1)

def attention(c, q, k, v):  # q [B,T,H,hd], k,v [B,T,KV,hd]
    B, T = q.shape[:2]; G = c.H // c.KV; scale = 1.0 / math.sqrt(c.hd)
    if c.attn == 'dpa':
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    mask = jnp.tril(jnp.ones((T, T), bool))
    if c.attn == 'repeat':
        k = jnp.repeat(k, G, axis=2); v = jnp.repeat(v, G, axis=2)
        s = jnp.einsum('bthd,bshd->bhts', q, k) * scale
        s = jnp.where(mask, s, -1e30)
        p = jax.nn.softmax(s, -1)
        return jnp.einsum('bhts,bshd->bthd', p, v)
    if c.attn == 'vjp':
        return attn_vjp(q, k, v)
    qg = q.reshape(B, T, c.KV, G, c.hd)
    s = jnp.einsum('btkgh,bskh->bkgts', qg, k) * scale
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, -1)
    o = jnp.einsum('bkgts,bskh->btkgh', p, v)
    return o.reshape(B, T, c.H, c.hd)

# custom_vjp attention: heads-major layout, saves probabilities
@jax.custom_vjp
def attn_vjp(q, k, v):
    return _attn_fwd(q, k, v)[0]
def _attn_core(q, k, v):
    B, T, H, hd = q.shape; KV = k.shape[2]; G = H // KV
    qg = q.reshape(B, T, KV, G, hd)
    s = jnp.einsum('btkgh,bskh->bkgts', qg, k) * (1.0 / math.sqrt(hd))
    mask = jnp.tril(jnp.ones((T, T), bool))
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    p = e / jnp.sum(e, -1, keepdims=True)
    o = jnp.einsum('bkgts,bskh->btkgh', p, v).reshape(B, T, H, hd)
    return o, p
def _attn_fwd(q, k, v):
    o, p = _attn_core(q, k, v)
    return o, (q, k, v, p)
def _attn_bwd(res, do):
    q, k, v, p = res
    B, T, H, hd = q.shape; KV = k.shape[2]; G = H // KV
    dog = do.reshape(B, T, KV, G, hd); qg = q.reshape(B, T, KV, G, hd)
    dv = jnp.einsum('bkgts,btkgh->bskh', p, dog)
    dp = jnp.einsum('btkgh,bskh->bkgts', dog, v)
    ds = p * (dp - jnp.sum(dp * p, -1, keepdims=True)) * (1.0 / math.sqrt(hd))
    dq = jnp.einsum('bkgts,bskh->btkgh', ds, k).reshape(B, T, H, hd)
    dk = jnp.einsum('bkgts,btkgh->bskh', ds, qg)
    return dq, dk, dv
attn_vjp.defvjp(_attn_fwd, _attn_bwd)

def block(c, x, lp, cos, sin):
    B, T, _ = x.shape
    h = rmsnorm(x, lp['n1'])
    if c.fuse_qkv:
        qkv = linear(c, h, lp['wqkv'])
        q, k, v = jnp.split(qkv, [c.H*c.hd, (c.H+c.KV)*c.hd], -1)
    else:
        q, k, v = linear(c, h, lp['wq']), linear(c, h, lp['wk']), linear(c, h, lp['wv'])
    q = apply_rope(q.reshape(B, T, c.H, c.hd), cos, sin)
    k = apply_rope(k.reshape(B, T, c.KV, c.hd), cos, sin)
    v = v.reshape(B, T, c.KV, c.hd)
    o = attention(c, q, k, v).reshape(B, T, c.H*c.hd)
    x = x + linear(c, o, lp['wo'])
    h = rmsnorm(x, lp['n2'])
    if c.fuse_gu:
        gu = linear(c, h, lp['wgu']); g, u = jnp.split(gu, 2, -1)
    else:
        g, u = linear(c, h, lp['wg']), linear(c, h, lp['wu'])
    x = x + linear(c, jax.nn.silu(g) * u, lp['wd'])
    return x

# ---------------- LM head + CE ----------------
def _head_logits(h, w, layout):
    return h @ w if layout == 'io' else jnp.einsum('nd,vd->nv', h, w)

def _make_ce_vjp(layout, chunks):
    @jax.custom_vjp
    def ce(h, w, labels):
        return _fwd(h, w, labels)[0]
    def _chunk_fwd(hc, w, lc):
        logits = _head_logits(hc, w, layout)
        m = jnp.max(logits, -1, keepdims=True)
        lse = jnp.log(jnp.sum(jnp.exp(logits - m), -1)) + m[:, 0]
        tgt = jnp.take_along_axis(logits, lc[:, None], -1)[:, 0]
        return jnp.sum(lse - tgt), lse
    def _fwd(h, w, labels):
        N = h.shape[0]
        if chunks == 1:
            loss, lse = _chunk_fwd(h, w, labels)
        else:
            hc = h.reshape(chunks, N // chunks, -1); lc = labels.reshape(chunks, -1)
            losses, lse = jax.lax.map(lambda a: _chunk_fwd(a[0], w, a[1]), (hc, lc))
            loss = jnp.sum(losses); lse = lse.reshape(N)
        return loss / N, (h, w, labels, lse)
    def _bwd(res, g):
        h, w, labels, lse = res
        N = h.shape[0]; scale = g / N
        def chunk_grads(hc, lc, lsec):
            logits = _head_logits(hc, w, layout)
            p = jnp.exp(logits - lsec[:, None])
            dl = (p - jax.nn.one_hot(lc, p.shape[-1], dtype=p.dtype)) * scale
            if layout == 'io':
                dh = jnp.einsum('nv,dv->nd', dl, w); dw = jnp.einsum('nd,nv->dv', hc, dl)
            else:
                dh = jnp.einsum('nv,vd->nd', dl, w); dw = jnp.einsum('nv,nd->vd', dl, hc)
            return dh, dw
        if chunks == 1:
            dh, dw = chunk_grads(h, labels, lse)
        else:
            hc = h.reshape(chunks, N // chunks, -1); lc = labels.reshape(chunks, -1); lsc = lse.reshape(chunks, -1)
            def body(acc, a):
                dh, dw = chunk_grads(*a)
                return acc + dw, dh
            dw, dh = jax.lax.scan(body, jnp.zeros_like(w), (hc, lc, lsc))
            dh = dh.reshape(N, -1)
        return dh, dw, None
    ce.defvjp(_fwd, _bwd)
    return ce

def lm_loss(c, params, tokens, labels):
    x = params['embed'][tokens]
    cos, sin = rope_tables(c)
    blk = lambda x, lp: block(c, x, lp, cos, sin)
    if c.remat: blk = jax.checkpoint(blk)
    if c.unroll == 0:
        for i in range(c.L):
            x = blk(x, jax.tree.map(lambda a: a[i], params['layers']))
    else:
        x, _ = jax.lax.scan(lambda x, lp: (blk(x, lp), None), x, params['layers'], unroll=c.unroll)
    h = rmsnorm(x, params['norm']).reshape(-1, c.d)
    lab = labels.reshape(-1)
    if c.ce in ('vjp', 'vjp_chunk'):
        return _make_ce_vjp(c.head_layout, 1 if c.ce == 'vjp' else c.ce_chunks)(h, params['head'], lab)
    logits = _head_logits(h, params['head'], c.head_layout)
    if c.ce == 'logsoftmax':
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, lab[:, None], -1))
    lse = jax.nn.logsumexp(logits, -1)
    if c.ce == 'lse_take':
        return jnp.mean(lse - jnp.take_along_axis(logits, lab[:, None], -1)[:, 0])
    if c.ce == 'lse_onehot':
        return jnp.mean(lse - jnp.sum(logits * jax.nn.one_hot(lab, c.V, dtype=logits.dtype), -1))
    raise ValueError(c.ce)

def make_opt():
    return optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)

def make_step(c):
    opt = make_opt()
    def step(params, opt_state, tokens, labels):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(c, p, tokens, labels))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss
    j = jax.jit(step, donate_argnums=(0, 1))
    if not c.xopts: return j
    def _conv(v):
        if v in ('true', 'false'): return v == 'true'
        try: return int(v)
        except ValueError: return v
    opts = {k: _conv(v) for k, v in (kv.split('~') for kv in c.xopts.split(';'))}
    cache = {}
    def run(p, o, t, l):
        if 'f' not in cache: cache['f'] = j.lower(p, o, t, l).compile(compiler_options=opts)
        return cache['f'](p, o, t, l)
    run.lower = j.lower
    return run

def init_state(c, seed=0):
    params = init_params(c, jax.random.PRNGKey(seed))
    return params, make_opt().init(params)

def batch(c, seed=0):
    t = jax.random.randint(jax.random.PRNGKey(seed + 1), (c.B, c.T + 1), 0, c.V)
    return t[:, :-1], t[:, 1:]
