"""Model and optimizer state, created already sharded, and the jitted train step.

The model lives as (graphdef, params, rest): `params` are the nnx.Param arrays
the optimizer updates, `rest` any other model state. Steps are pure functions
of these arrays under `jax.jit`, which keeps Python overhead out of the hot
loop; `nnx.merge` rebuilds the module only while tracing.
"""

import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import optax

from flashmm_jax import models
from flashmm_jax.training import checkpoint
from flashmm_jax.training import losses
from flashmm_jax.training import sharding


def build_model(config, seed=None):
  seed = config.seed if seed is None else seed
  return models.FlashMM(config.model, config.data.image_size, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """Static structure of a train state: graphdef, abstract arrays and shardings."""
  graphdef: Any
  params: Any      # abstract (ShapeDtypeStruct) trees
  rest: Any
  opt_state: Any
  shardings: Any   # (params, rest, opt_state) NamedShardings


def _init_arrays(config, tx):
  model = build_model(config)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return params, rest, tx.init(params)


def make_state_spec(config, tx, mesh):
  """Shapes and shardings of the train state, without allocating it."""
  abstract_model = nnx.eval_shape(lambda: build_model(config))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  params, rest, opt_state = jax.eval_shape(functools.partial(_init_arrays, config, tx))
  shardings = sharding.state_shardings((params, rest, opt_state), mesh,
                                       config.logical_axis_rules)
  return StateSpec(graphdef, params, rest, opt_state, shardings)


def init_state(config, tx, spec):
  """Creates (params, rest, opt_state), each array born on its own shards."""
  init = jax.jit(functools.partial(_init_arrays, config, tx), out_shardings=spec.shardings)
  return init()


def abstract_with_shardings(tree, shardings):
  """Abstract arrays that tell orbax where each restored array goes."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def make_train_step(spec, tx, label_smoothing=0.0):
  """Returns a jitted step (params, rest, opt_state, batch) -> (params, opt_state, metrics)."""

  def step(params, rest, opt_state, batch):
    def loss_fn(p):
      model = nnx.merge(spec.graphdef, p, rest)
      logits = model(batch['image'], batch['text'], batch['prefix_len'], batch['text_len'])
      return losses.answer_cross_entropy(logits, batch['text'], batch['target_mask'],
                                         label_smoothing)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return params, opt_state, metrics

  p_sh, _, o_sh = spec.shardings
  return jax.jit(step, donate_argnums=(0, 2), out_shardings=(p_sh, o_sh, None))


def merge_model(spec, params, rest):
  return nnx.merge(spec.graphdef, params, rest)


def restore_model(config, path, mesh):
  """Builds the config's model with params from a checkpoint (workdir or step dir).

  The one restore path for eval, distillation teachers and serving.
  Returns (model, step, meta).
  """
  with sharding.activate(mesh, config.logical_axis_rules):
    abstract_model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params, _ = nnx.split(abstract_model, nnx.Param, ...)
    p_sh = sharding.state_shardings(params, mesh, config.logical_axis_rules)
    step, params, meta = checkpoint.restore_params(path, abstract_with_shardings(params, p_sh))
    rest = init_rest(config)
  return nnx.merge(graphdef, params, rest), step, meta


def init_rest(config):
  """The model's non-param state alone: XLA drops the unused param init, so a
  restore never holds a second copy of the params."""
  return jax.jit(lambda: nnx.split(build_model(config), nnx.Param, ...)[2])()
