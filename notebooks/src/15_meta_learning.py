# %% [markdown]
# # 15 Meta-learning: MAML on sinusoids
#
# Model-Agnostic Meta-Learning (Finn et al. 2017) learns an **initialisation** θ from which a few SGD steps
# on a new task's handful of points (the *support* set) give a good model for that task (scored on its
# *query* points). The meta-gradient differentiates *through* the inner SGD steps: second-order MAML keeps
# the Hessian terms, `(I − αH) ∇L_query(θ')` for one step. `picotron_jax.meta` runs it on the mesh: the task
# batch is vmapped and split over `data`, the MLP's hidden units over `tensor`. The task family: sinusoids
# `y = A sin(x − φ)` with random amplitude and phase; a task is 10 points.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.meta.loop import run_meta
from picotron_jax.meta.sine import init_mlp, mse, sample_tasks
from picotron_jax.tutorials import scale

print(jax.device_count(), "devices")

# %% [markdown]
# ## Meta-train, then adapt to held-out tasks
#
# `meshes/maml-sine.yaml` (dp2 x tp2 with ZeRO-3, one inner step at lr 0.01), shortened here to 800 meta-steps
# with a 3x larger outer learning rate (the preset's 3000 steps at 1e-3 get the held-out loss after 5 steps to
# 0.45, against 1.9 pre-trained). The baseline is
# the same MLP trained conventionally with Adam on the pooled points of the same tasks, for as many gradient
# evaluations. Both are then adapted on held-out tasks, which training never drew.

# %%
cfg = pj.load_config("maml-sine", ["meta.steps=800", "meta.outer_lr=3e-3", "meta.log_every=200", "meta.eval_steps=5",
                                   "meta.eval_tasks=50"])
result = run_meta(cfg)
assert result["meta"][5] < result["baseline"][5]  # after 5 steps the meta-learned start is ahead

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(result["meta"], "o-", label="MAML initialisation")
ax.plot(result["baseline"], "s-", label="pre-trained on pooled tasks")
ax.set_xlabel("inner SGD steps on the support set")
ax.set_ylabel("held-out query MSE")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise: the inner loop
#
# Write `adapt(loss_fn, theta, support, lr, steps)`: `theta` (a pytree of arrays) after `steps` plain SGD
# steps of `loss_fn(params, support)` with learning rate `lr`. Keep it differentiable: MAML takes the
# gradient of the query loss of your result with respect to `theta`, through every inner step. The check
# compares your adapted parameters with the meta learner's, and your meta-gradient with second-order MAML's,
# on a sinusoid task with the lesson's MLP.

# %% answer
def adapt(loss_fn, theta, support, lr, steps):
    for _ in range(steps):
        g = jax.grad(loss_fn)(theta, support)
        theta = jax.tree.map(lambda p, gp: p - lr * gp, theta, g)
    return theta
# %% blank
def adapt(loss_fn, theta, support, lr, steps):
    return ...

# %%
task = jax.tree.map(lambda a: jnp.asarray(a[0]), sample_tasks(seed=7, index=0, num_tasks=1, k_support=10, k_query=10))
scale.check_adapt(adapt, mse, init_mlp(0, 40), task["support"], task["query"], lr=0.01, steps=2)
