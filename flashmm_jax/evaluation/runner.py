"""Greedy-decodes each task's eval split and scores it; writes JSON and markdown.

The model is given, already restored; this module knows nothing of training.
Every batch has the same shapes (the data pipeline pads the last one), so the
decode function compiles once for the whole suite.
"""

import functools
import json
import time

from absl import logging
from etils import epath
from flax import nnx
import jax
import numpy as np

from flashmm_jax import models
from flashmm_jax.data import pipeline
from flashmm_jax.data import tasks as tasks_lib
from flashmm_jax.evaluation import metrics


def make_decoder(model, max_new_tokens, eos_id):
  """A jitted (image, text, prefix_len) -> tokens function over the model's state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, image, text, prefix_len):
    return models.generate(nnx.merge(graphdef, state), image, text, prefix_len,
                           max_new_tokens=max_new_tokens, eos_id=eos_id)

  return functools.partial(decode, state)


def evaluate_task(decode, config, tokenizer, task, noise='', put=None):
  """Returns (mean score, n, examples of (prompt, prediction, answer))."""
  metric = tasks_lib.task_metric(task)
  scores, samples = [], []
  for batch in pipeline.eval_batches(config, tokenizer, task, noise=noise):
    inputs = {k: batch[k] for k in ('image', 'text', 'prefix_len')}
    if put is not None:
      inputs = put(inputs)
    tokens = np.asarray(decode(inputs['image'], inputs['text'], inputs['prefix_len']))
    for row, answer, valid in zip(tokens, batch['answers'], batch['valid']):
      if valid:
        prediction = tokenizer.decode(row.tolist())
        scores.append(metrics.score(metric, prediction, answer))
        if len(samples) < 3:
          samples.append((prediction, answer))
  return float(np.mean(scores)), len(scores), samples


def evaluate(model, config, tokenizer, noise='', put=None):
  """Scores every configured task; returns the results dict written to JSON."""
  decode = make_decoder(model, config.eval.max_decode_len, tokenizer.eos_id)
  results = {}
  for task in pipeline.eval_tasks(config):
    t0 = time.perf_counter()
    score, n, samples = evaluate_task(decode, config, tokenizer, task, noise, put)
    results[task] = {'score': score, 'metric': tasks_lib.task_metric(task), 'n': n}
    logging.info('eval %-15s %.3f (n=%d, %.1fs) e.g. %s', task, score, n,
                 time.perf_counter() - t0, samples[:2])
  mean = float(np.mean([r['score'] for r in results.values()]))
  return {'tasks': results, 'mean': mean, 'noise': noise}


def results_markdown(results, title='Eval'):
  lines = [f'## {title}', '', '| task | metric | score | n |', '| --- | --- | --- | --- |']
  for task, r in results['tasks'].items():
    lines.append(f'| {task} | {r["metric"]} | {100 * r["score"]:.1f} | {r["n"]} |')
  lines.append(f'| **mean** | | **{100 * results["mean"]:.1f}** | |')
  return '\n'.join(lines) + '\n'


def write_results(results, out_dir, noise=''):
  """Writes results(.json|.md), suffixed with the noise setting if any."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = 'results' + (f'_{noise.replace(":", "_")}' if noise else '')
  (out_dir / f'{stem}.json').write_text(json.dumps(results, indent=2))
  title = f'Eval at step {results.get("step", "?")}' + (f', noise {noise}' if noise else '')
  (out_dir / f'{stem}.md').write_text(results_markdown(results, title))
  return out_dir / f'{stem}.json'
