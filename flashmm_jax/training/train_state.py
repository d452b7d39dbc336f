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
from flashmm_jax.models import gate
from flashmm_jax.training import checkpoint
from flashmm_jax.training import losses
from flashmm_jax.training import optimizer
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


def check_trainable(spec, trainable, gate_loss_weight):
  """The trainable mask of the state's params; fails if it would train nothing."""
  mask = optimizer.trainable_mask(spec.params, trainable)
  if trainable == 'gate' and not any(jax.tree.leaves(mask)):
    raise ValueError("config.train.trainable='gate' but the model has no sparse gate; "
                     'set config.model.sparse.enabled=True')
  if trainable == 'gate' and gate_loss_weight <= 0:
    raise ValueError("config.train.trainable='gate' needs config.train.gate_loss_weight > 0: "
                     'the gate learns only from its distillation loss')
  return mask


def _loss(model, batch, label_smoothing, gate_loss_weight):
  """Answer CE plus the weighted gate KL; metrics include the gate's figures."""
  gate.set_distill(model, gate_loss_weight > 0)
  forward = lambda m: m(batch['image'], batch['text'], batch['prefix_len'], batch['text_len'])
  logits, captured = nnx.capture(forward, nnx.Intermediate)(model)
  loss, metrics = losses.answer_cross_entropy(logits, batch['text'], batch['target_mask'],
                                              label_smoothing)
  stats = gate.layer_stats(captured)
  metrics.update(gate.sparsity_metrics(stats))
  if 'gate_kl' in stats:
    metrics['lm_loss'] = loss
    loss = loss + gate_loss_weight * metrics['gate/kl']
    metrics['loss'] = loss
  return loss, metrics


def make_train_step(spec, tx, label_smoothing=0.0, gate_loss_weight=0.0, trainable='all'):
  """Returns a jitted step (params, rest, opt_state, batch) -> (params, opt_state, metrics)."""
  mask = check_trainable(spec, trainable, gate_loss_weight)

  def step(params, rest, opt_state, batch):
    def loss_fn(p):
      # Frozen params as constants: XLA drops the backward pass they would need.
      p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, mask)
      return _loss(nnx.merge(spec.graphdef, p, rest), batch, label_smoothing, gate_loss_weight)

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


def _init_params(config, spec, keep):
  """Fresh params that match the nnx filter `keep`, alone: XLA drops the other inits."""
  shardings = nnx.split_state(spec.shardings[0], keep, ...)[0]
  def init():
    return nnx.split_state(nnx.split(build_model(config), nnx.Param, ...)[1], keep, ...)[0]
  return jax.jit(init, out_shardings=shardings)()


def init_from_checkpoint(config, tx, spec, path):
  """A fresh train state (step 0) whose params come from the checkpoint at `path`.

  The one exception: sparse gate params a (dense) checkpoint lacks keep their
  fresh init. Any other missing, unexpected or reshaped param is an error
  naming it. Returns (params, rest, opt_state).
  """
  is_gate = nnx.PathContains(gate.GATE_NAME)
  wanted, shardings = spec.params, spec.shardings[0]
  fresh_gate = not any(gate.GATE_NAME in n.split('/') for n in checkpoint.param_names(path))
  if fresh_gate:
    wanted = nnx.split_state(wanted, is_gate, ...)[1]
    shardings = nnx.split_state(shardings, is_gate, ...)[1]
  # Restore first: a mismatched checkpoint fails before any compute.
  _, params, _ = checkpoint.restore_params(path, abstract_with_shardings(wanted, shardings))
  if fresh_gate:
    params = nnx.merge_state(params, _init_params(config, spec, is_gate))
  opt_state = jax.jit(tx.init, out_shardings=spec.shardings[2])(params)
  return params, init_rest(config), opt_state
