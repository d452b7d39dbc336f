"""Orbax checkpoints of the train state, with errors that name the problem.

A checkpoint step holds three items: `params` (the model's nnx.State), `opt_state`
(optax state) and `meta` (JSON: step, config). Orbax writes each step into a
temporary directory and renames it when complete, so a crash never leaves a
half-written step behind and an existing step is never overwritten. Evaluation,
distillation and serving restore params through `restore_params`, the one place
that knows the layout.
"""

import os

from etils import epath
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir):
  return epath.Path(workdir) / 'checkpoints'


def _one_writer_per_array():
  """Orbax's array handler without replica-parallel saving (each replica of a
  replicated array writing a slice of it), unless several hosts share the
  writing. On one host it only adds work: on 8 CPU devices a trainer test took
  36.6 s with it and 15.1 without, the first save's slicing (tests/training/
  test_trainer.py, one-and-eight-devices). Orbax itself turns it off when
  JAX_PLATFORMS names a GPU; this turns it off on any single host."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
      override=True)


def make_manager(workdir, keep=3, read_only=False):
  _one_writer_per_array()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  # Handlers named up front, so a fresh manager can read metadata before restoring.
  handlers = {'params': ocp.StandardCheckpointHandler(),
              'opt_state': ocp.StandardCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=handlers)


def save(manager, step, params, opt_state, meta):
  """Saves one step and waits, so a reported step is really on disk.
  opt_state None: a params-only step (export_params), not a resume point."""
  if step in manager.all_steps():
    raise FileExistsError(f'checkpoint step {step} already exists in {manager.directory}; '
                          'refusing to overwrite it')
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  manager.save(step, args=ocp.args.Composite(**items))
  manager.wait_until_finished()


def _leaf_shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = (jax.tree_util.keystr(path, simple=True, separator='/') for path, _ in flat)
  # nnx Variables add a trailing 'value' level that tells the user nothing.
  names = (n[:-len('/value')] if n.endswith('/value') else n for n in names)
  return {n: tuple(leaf.shape) for n, (_, leaf) in zip(names, flat)}


def check_shapes(saved_metadata, abstract, where):
  """Raises if the checkpoint's arrays do not match the model the config builds."""
  saved, wanted = _leaf_shapes(saved_metadata), _leaf_shapes(abstract)
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing or extra:
    raise ValueError(f'checkpoint {where} does not match the config: params missing from '
                     f'the checkpoint {missing[:3]}, unexpected {extra[:3]}')
  for name, shape in wanted.items():
    if saved[name] != shape:
      raise ValueError(f'checkpoint {where} does not match the config: {name} has shape '
                       f'{saved[name]} in the checkpoint but {shape} in the model')


def resolve_step(manager, step=None):
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint found in {manager.directory}')
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f'checkpoint step {step} not in {manager.directory} '
                            f'(available: {sorted(steps)})')
  return step


def _restore_items(manager, step, **abstract_items):
  where = f'{manager.directory}/{step}'
  try:
    metadata = manager.item_metadata(step)
    for name, abstract in abstract_items.items():
      if name != 'meta':
        saved = metadata[name] if name in metadata.keys() else None
        if saved is None:
          hint = ' (a params-only export: use it as train.init_from)' if name == 'opt_state' else ''
          raise ValueError(f'item {name!r} is missing{hint}')
        check_shapes(saved, abstract, where)
  except ValueError as e:
    if 'does not match the config' in str(e):
      raise
    raise ValueError(f'checkpoint {where} is corrupt or unreadable: {e}') from None
  args = {name: (ocp.args.JsonRestore() if name == 'meta' else ocp.args.StandardRestore(a))
          for name, a in abstract_items.items()}
  try:
    return manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types for damaged files
    raise ValueError(f'checkpoint {where} is corrupt or unreadable: '
                     f'{type(e).__name__}: {str(e)[:300]}') from None


def restore_train_state(manager, abstract_params, abstract_opt_state, step=None):
  """Returns (step, params, opt_state, meta) of the latest (or given) step."""
  step = resolve_step(manager, step)
  r = _restore_items(manager, step, params=abstract_params,
                     opt_state=abstract_opt_state, meta=None)
  return step, r['params'], r['opt_state'], r['meta']


def _open(path):
  """(read-only manager, step) for a workdir (latest step) or a step directory."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    manager, step = make_manager(path.parent.parent, read_only=True), int(path.name)
  else:
    manager, step = make_manager(path, read_only=True), None
  return manager, resolve_step(manager, step)


def restore_params(path, abstract_params):
  """Restores model params from a workdir (latest step) or a step directory.

  `path` is either a training workdir or `WORKDIR/checkpoints/STEP`.
  Returns (step, params, meta).
  """
  manager, step = _open(path)
  r = _restore_items(manager, step, params=abstract_params, meta=None)
  return step, r['params'], r['meta']


def export_params(src, dst, dtype='bfloat16'):
  """Writes the params of checkpoint `src` (workdir or step dir), floats cast
  to `dtype`, as a params-only checkpoint in workdir `dst` (same step, meta
  plus 'exported_dtype'): small enough to move between machines, e.g. a
  device machine's 30-minute hold. `init_from` and `restore_model` read it
  like any checkpoint, casting back to the model's param dtype; resuming
  training from it fails (no optimizer state). Returns the step."""
  manager, step = _open(src)
  r = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                    meta=ocp.args.JsonRestore()))
  cast = lambda x: x.astype(dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
  save(make_manager(dst, keep=1), step, jax.tree_util.tree_map(cast, r['params']), None,
       dict(r['meta'] or {}, exported_dtype=str(dtype)))
  return step


def param_names(path):
  """Names of the params saved at `path` ('decoder/blocks/0/attn/q/kernel', ...)."""
  manager, step = _open(path)
  try:
    return set(_leaf_shapes(manager.item_metadata(step)['params']))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'checkpoint {manager.directory}/{step} is corrupt or unreadable: '
                     f'{type(e).__name__}: {e}') from None


def check_writable(workdir):
  """Fails early, before any compute, if the workdir cannot take checkpoints."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(f'workdir {workdir} is not writable: {e.strerror or e}') from None
