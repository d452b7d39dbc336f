"""Tables and curves for the sparse-attention accuracy recipe (sparse_accuracy_gpu.sh).

  python benchmarks/sparse_report.py pick MIN_SPARSITY EVAL_DIR
      the sweep setting (a subdirectory of EVAL_DIR written by eval.py --sweep)
      that keeps the most blocks while reaching MIN_SPARSITY: chosen on
      sparsity alone, never on accuracy
  python benchmarks/sparse_report.py flags RESULTS.json
      the --config.model.sparse.* flags of the rule a result was scored with
  python benchmarks/sparse_report.py rule_flags RULE
      the same flags for a rule as eval.py --sweep takes it (keys left out keep the
      config's values)
  python benchmarks/sparse_report.py name RULE
      the sweep directory eval.py --sweep=RULE writes under
  python benchmarks/sparse_report.py report OUT_STEM --dense D.json --sparse S.json \
      [--curve LABEL=EVAL_DIR ...] [--reference LABEL=R.json ...] [--dense_label L]

`report` writes OUT_STEM.json and OUT_STEM.md: accuracy of the dense and the
sparse model per task, the difference in points (with its standard error,
pairing the models example by example, where both results.json hold per-example
scores), the sparse run's block
sparsity (over the tiles the prefix-LM mask leaves visible, prefill of the
eval batches) and attention FLOPs saved; each curve (one model scored under
several selection rules) adds rows to a sparsity / accuracy table and a line
to OUT_STEM.png.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
  with open(path) as f:
    return json.load(f)


def sweep(eval_dir):
  """{setting name: results} of the eval.py --sweep runs under eval_dir."""
  paths = sorted(glob.glob(os.path.join(eval_dir, '*', 'results.json')))
  if not paths:
    raise SystemExit(f'no sweep results under {eval_dir}/*/results.json')
  return {os.path.basename(os.path.dirname(p)): load(p) for p in paths}


def overall(results):
  return results['sparsity']['sparsity/overall']


def pick(min_sparsity, eval_dir):
  results = sweep(eval_dir)
  ok = {name: r for name, r in results.items() if overall(r) >= min_sparsity}
  if not ok:
    best = max(overall(r) for r in results.values())
    raise SystemExit(f'no setting under {eval_dir} reaches sparsity {min_sparsity} (best {best:.3f})')
  return min(ok, key=lambda name: overall(ok[name]))


def flags(selection):
  """The --config.model.sparse.* flags of a selection rule (a dict)."""
  return ' '.join(f'--config.model.sparse.{k}={v}' for k, v in selection.items())


def paired_variance(task, d, s):
  """Variance of the mean score difference on one task, pairing the two models'
  per-example scores (results.json 'scores'; the eval split is fixed), or None
  when either result predates them."""
  if 'scores' not in d or 'scores' not in s:
    return None
  a, b = np.asarray(d['scores'], np.float64), np.asarray(s['scores'], np.float64)
  if a.shape != b.shape:
    raise ValueError(f'task {task}: {a.size} dense and {b.size} sparse per-example scores; '
                     'not the same eval split (config.data.eval_examples?)')
  return float(np.var(b - a, ddof=1) / a.size) if a.size > 1 else 0.0


def compare(dense, sparse):
  """Per task and overall: both models' scores, the difference in points and, where
  both results hold per-example scores, its paired standard error (delta_se)."""
  rows, variances = [], []
  for task, d in dense['tasks'].items():
    s = sparse['tasks'][task]
    sp = s.get('sparsity', {})
    var = paired_variance(task, d, s)
    variances.append(var)
    rows.append(dict(task=task, dense=d['score'], sparse=s['score'],
                     delta_points=100 * (s['score'] - d['score']),
                     delta_se=None if var is None else 100 * var ** 0.5,
                     sparsity=sp.get('sparsity/overall'),
                     attn_flops_saved=sp.get('attn_flops_saved')))
  # The mean over tasks of independent per-task differences.
  mean_se = (None if None in variances
             else 100 * sum(variances) ** 0.5 / len(variances))
  summary = dict(dense_mean=dense['mean'], sparse_mean=sparse['mean'],
                 delta_points=100 * (sparse['mean'] - dense['mean']), delta_se=mean_se,
                 sparsity=sparse.get('sparsity', {}), selection=sparse.get('selection'),
                 target=sparse.get('target'))
  return dict(rows=rows, summary=summary)


def _delta(row):
  se = row.get('delta_se')
  return f"{row['delta_points']:+.1f}" + ('' if se is None else f' ± {se:.1f}')


def markdown(report):
  pct = lambda x: '' if x is None else f'{100 * x:.1f}'
  s = report['summary']
  paired = s.get('delta_se') is not None
  lines = [f"| task | dense | sparse | delta (points{', ± paired s.e.' if paired else ''}) "
           '| block sparsity % | attn GFLOP saved |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in report['rows']:
    saved = '' if r['attn_flops_saved'] is None else f"{r['attn_flops_saved'] / 1e9:.1f}"
    lines.append(f"| {r['task']} | {pct(r['dense'])} | {pct(r['sparse'])} | "
                 f"{_delta(r)} | {pct(r['sparsity'])} | {saved} |")
  lines.append(f"| **mean** | **{pct(s['dense_mean'])}** | **{pct(s['sparse_mean'])}** | "
               f"**{_delta(s)}** | "
               f"**{pct(s['sparsity'].get('sparsity/overall'))}** | |")
  layers = sorted(k for k in s['sparsity'] if k.startswith('sparsity/layer_'))
  if layers:
    lines += ['', 'Sparsity per layer: ' + ', '.join(
        f"{k.split('_')[-1]}: {pct(s['sparsity'][k])}%" for k in layers)]
  return '\n'.join(lines) + '\n'


def curve_points(curves):
  """[(label, setting, sparsity %, mean accuracy %)] sorted by sparsity within a curve."""
  points = []
  for label, eval_dir in curves:
    rows = [(label, name, 100 * overall(r), 100 * r['mean']) for name, r in sweep(eval_dir).items()]
    points += sorted(rows, key=lambda p: p[2])
  return points


def plot(points, references, dense, stem, dense_label):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for label in dict.fromkeys(p[0] for p in points):
    pts = [p for p in points if p[0] == label]
    ax.plot([p[2] for p in pts], [p[3] for p in pts], 'o-', label=label)
    for _, name, x, y in pts:
      ax.annotate(name.replace('threshold', 'thr').replace('coverage', 'cov'), (x, y),
                  fontsize=6, xytext=(3, 3), textcoords='offset points')
  ax.axhline(100 * dense['mean'], color='k', lw=0.8, label=dense_label)
  ax.axhline(100 * dense['mean'] - 0.5, color='r', lw=0.8, ls=':', label='-0.5 pt')
  for (label, r), ls in zip(references, ('--', '-.', ':')):
    ax.axhline(100 * r['mean'], color='gray', lw=0.8, ls=ls, label=label)
  ax.axvline(60, color='gray', lw=0.5)
  ax.set_xlabel('block sparsity over visible tiles (%)')
  ax.set_ylabel('mean accuracy, 12 tasks (%)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(stem + '.png', dpi=130)


def report(stem, dense_path, sparse_path, curves, references, dense_label='dense baseline'):
  dense, sparse = load(dense_path), load(sparse_path)
  out = compare(dense, sparse)
  table = f'Dense column: {dense_label}.\n\n' + markdown(out)
  refs = [(label, load(path)) for label, path in references]
  out['references'] = {label: r['mean'] for label, r in refs}
  table += ''.join(f'\n{label}: mean {100 * r["mean"]:.1f}\n' for label, r in refs)
  if curves:
    points = curve_points(curves)
    plot(points, refs, dense, stem, dense_label)
    out['curves'] = [dict(model=l, setting=n, sparsity=x, mean=y) for l, n, x, y in points]
    table += ('\n| model | selection | block sparsity % | mean accuracy % |\n'
              '| --- | --- | --- | --- |\n'
              + ''.join(f'| {l} | {n} | {x:.1f} | {y:.1f} |\n' for l, n, x, y in points))
  with open(stem + '.json', 'w') as f:
    json.dump(out, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write(table)
  print(table)


def labelled(text):
  label, sep, path = text.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'{text!r} must be LABEL=PATH')
  return label, path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('pick')
  p.add_argument('min_sparsity', type=float)
  p.add_argument('eval_dir')
  p = sub.add_parser('flags')
  p.add_argument('results')
  p = sub.add_parser('rule_flags')
  p.add_argument('rule')
  p = sub.add_parser('name')
  p.add_argument('rule')
  p = sub.add_parser('report')
  p.add_argument('stem')
  p.add_argument('--dense', required=True)
  p.add_argument('--sparse', required=True)
  p.add_argument('--curve', type=labelled, action='append', default=[])
  p.add_argument('--reference', type=labelled, action='append', default=[])
  p.add_argument('--dense_label', default='dense baseline', help='its line in the plot')
  args = parser.parse_args()
  if args.command == 'pick':
    print(pick(args.min_sparsity, args.eval_dir))
  elif args.command == 'flags':
    print(flags(load(args.results)['selection']))
  elif args.command in ('name', 'rule_flags'):
    from flashmm_jax.models import gate  # pylint: disable=g-import-not-at-top
    rule = gate.parse_rule(args.rule)
    print(gate.rule_name(rule) if args.command == 'name' else flags(rule))
  else:
    report(args.stem, args.dense, args.sparse, args.curve, args.reference, args.dense_label)


if __name__ == '__main__':
  main()
