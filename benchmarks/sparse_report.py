"""Dense vs gated-sparse eval results side by side, per task.

  python benchmarks/sparse_report.py OUT_STEM DENSE.json SPARSE.json [MORE_SPARSE.json ...]

Writes OUT_STEM.json and OUT_STEM.md: accuracy of each, the difference in
points, and the sparse run's block sparsity (over the tiles the prefix-LM
mask leaves visible, prefill of the eval batches) and attention FLOPs saved.
Further sparse results (e.g. the same gate at other thresholds) add rows to a
sparsity / accuracy table and OUT_STEM.png.
"""

import json
import sys


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
                 sparsity=sparse.get('sparsity', {}))
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


def pareto(dense, sparses, stem):
  """Mean accuracy against overall block sparsity, one point per result."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = sorted((100 * s['sparsity']['sparsity/overall'], 100 * s['mean'],
                s.get('threshold')) for s in sparses)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label='gated sparse')
  for x, y, thr in pts:
    ax.annotate(f'thr {thr}', (x, y), fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.axhline(100 * dense['mean'], color='k', lw=0.8, label='dense')
  ax.axhline(100 * dense['mean'] - 0.5, color='r', lw=0.8, ls=':', label='dense - 0.5 pt')
  ax.set_xlabel('block sparsity over visible tiles (%)')
  ax.set_ylabel('mean accuracy, 12 tasks (%)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(stem + '.png', dpi=130)
  return pts


def main(stem, dense_path, *sparse_paths):
  load = lambda p: json.load(open(p))
  dense, sparses = load(dense_path), [load(p) for p in sparse_paths]
  report = compare(dense, sparses[0])
  table = markdown(report)
  if len(sparses) > 1:
    pts = pareto(dense, sparses, stem)
    report['pareto'] = [dict(sparsity=x, mean=y, threshold=t) for x, y, t in pts]
    table += ('\n| threshold | block sparsity % | mean accuracy % |\n| --- | --- | --- |\n'
              + ''.join(f'| {t} | {x:.1f} | {y:.1f} |\n' for x, y, t in pts))
  with open(stem + '.json', 'w') as f:
    json.dump(report, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main(*sys.argv[1:])
