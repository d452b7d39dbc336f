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
sparse model per task, the difference in points, the sparse run's block
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


def compare(dense, sparse):
  rows = []
  for task, d in dense['tasks'].items():
    s = sparse['tasks'][task]
    sp = s.get('sparsity', {})
    rows.append(dict(task=task, dense=d['score'], sparse=s['score'],
                     delta_points=100 * (s['score'] - d['score']),
                     sparsity=sp.get('sparsity/overall'),
                     attn_flops_saved=sp.get('attn_flops_saved')))
  summary = dict(dense_mean=dense['mean'], sparse_mean=sparse['mean'],
                 delta_points=100 * (sparse['mean'] - dense['mean']),
                 sparsity=sparse.get('sparsity', {}), selection=sparse.get('selection'),
                 target=sparse.get('target'))
  return dict(rows=rows, summary=summary)


def markdown(report):
  pct = lambda x: '' if x is None else f'{100 * x:.1f}'
  lines = ['| task | dense | sparse | delta (points) | block sparsity % | attn GFLOP saved |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in report['rows']:
    saved = '' if r['attn_flops_saved'] is None else f"{r['attn_flops_saved'] / 1e9:.1f}"
    lines.append(f"| {r['task']} | {pct(r['dense'])} | {pct(r['sparse'])} | "
                 f"{r['delta_points']:+.1f} | {pct(r['sparsity'])} | {saved} |")
  s = report['summary']
  lines.append(f"| **mean** | **{pct(s['dense_mean'])}** | **{pct(s['sparse_mean'])}** | "
               f"**{s['delta_points']:+.1f}** | "
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
