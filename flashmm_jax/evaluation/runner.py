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
from flashmm_jax.models import gate


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_new_tokens', 'eos_id'))
def _decode(graphdef, state, image, text, prefix_len, max_new_tokens, eos_id):
  run = lambda m: models.generate(m, image, text, prefix_len,
                                  max_new_tokens=max_new_tokens, eos_id=eos_id)
  tokens, captured = nnx.capture(run, nnx.Intermediate)(nnx.merge(graphdef, state))
  return tokens, gate.layer_stats(captured)


def make_decoder(model, max_new_tokens, eos_id):
  """A jitted (image, text, prefix_len) -> (tokens, gate stats) function over the
  model's state; the stats (gate.layer_stats of the prefill and, with sparse
  decode steps, of those: the model's gates count them from here on) are {}
  for a dense model. One jitted function for every decoder: models with equal
  graphdefs (e.g. one gate under a sweep of thresholds or coverages, which are
  state) share its compile."""
  gate.set_count_decode(model, True)
  graphdef, state = nnx.split(model)
  return functools.partial(_decode, graphdef, state, max_new_tokens=max_new_tokens,
                           eos_id=eos_id)


def _add_stats(total, stats):
  """Sums gate tile counts over batches, so a task's sparsity is over all its tiles."""
  for k, v in stats.items():
    total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
  return total


def evaluate_task(decode, config, tokenizer, task, noise='', put=None):
  """Returns (per-example scores, examples of (prediction, answer), summed gate stats)."""
  metric = tasks_lib.task_metric(task)
  scores, samples, stats = [], [], {}
  for batch in pipeline.eval_batches(config, tokenizer, task, noise=noise):
    inputs = {k: batch[k] for k in ('image', 'text', 'prefix_len')}
    if put is not None:
      inputs = put(inputs)
    tokens, batch_stats = decode(inputs['image'], inputs['text'], inputs['prefix_len'])
    stats = _add_stats(stats, batch_stats)
    for row, answer, valid in zip(np.asarray(tokens), batch['answers'], batch['valid']):
      if valid:
        prediction = tokenizer.decode(row.tolist())
        scores.append(metrics.score(metric, prediction, answer))
        if len(samples) < 3:
          samples.append((prediction, answer))
  return scores, samples, stats


def sparsity_summary(stats):
  """Plain-float sparsity figures for results.json: the eval batches' prefill
  and, when the model's decode steps are sparse, those steps (`.../decode...`)."""
  return {k: float(v) for k, v in gate.sparsity_metrics(stats).items()}


def evaluate(model, config, tokenizer, noise='', put=None):
  """Scores every configured task; returns the results dict written to JSON."""
  decode = make_decoder(model, config.eval.max_decode_len, tokenizer.eos_id)
  results, all_stats = {}, {}
  for task in pipeline.eval_tasks(config):
    t0 = time.perf_counter()
    scores, samples, stats = evaluate_task(decode, config, tokenizer, task, noise, put)
    score = float(np.mean(scores))
    # Per example too (the eval split is fixed): two models' results then pair up
    # example by example, for the standard error of their difference (sparse_report).
    results[task] = {'score': score, 'metric': tasks_lib.task_metric(task),
                     'n': len(scores), 'scores': [float(x) for x in scores]}
    if stats:
      results[task]['sparsity'] = sparsity_summary(stats)
      all_stats = _add_stats(all_stats, stats)
    logging.info('eval %-15s %.3f (n=%d, %.1fs) e.g. %s', task, score, len(scores),
                 time.perf_counter() - t0, samples[:2])
  mean = float(np.mean([r['score'] for r in results.values()]))
  out = {'tasks': results, 'mean': mean, 'noise': noise}
  if all_stats:
    out['sparsity'] = sparsity_summary(all_stats)
    out['selection'] = gate.selection_rule(model)
    out['target'] = config.model.sparse.target
  return out


def results_markdown(results, title='Eval'):
  names = {'sparsity/overall': 'sparsity', 'sparsity/decode': 'decode sparsity'}
  names = {k: v for k, v in names.items() if k in results.get('sparsity', {})}
  lines = [f'## {title}', '', '| task | metric | score | n |' + ''.join(
      f' {v} |' for v in names.values()), '| --- | --- | --- | --- |' + ' --- |' * len(names)]
  cell = lambda r: ''.join(f' {100 * r["sparsity"][k]:.1f}% |' if k in r.get('sparsity', {})
                           else ' |' for k in names)
  for task, r in results['tasks'].items():
    lines.append(f'| {task} | {r["metric"]} | {100 * r["score"]:.1f} | {r["n"]} |{cell(r)}')
  lines.append(f'| **mean** | | **{100 * results["mean"]:.1f}** | |{cell(results)}')
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
