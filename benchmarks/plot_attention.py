"""Plots benchmarks/attention.py's JSON: forward time over the best dense
kernel, per sequence length and block sparsity (causal rows).

  python benchmarks/plot_attention.py IN.json OUT.png
"""

import json
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def plot(data, path):
  env, rows = data['env'], [r for r in data['forward'] if r['prefix'] == 0]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for block_k in sorted({r['block_k'] for r in rows}):
    sel = sorted((r for r in rows if r['block_k'] == block_k), key=lambda r: r['seq'])
    for name, style in (('ours_dense', 'o-'), ('ours_s50', 's--'), ('ours_s65', '^-'),
                        ('ours_s65_persistent', 'D-'), ('ours_s80', 'v--')):
      pts = [(r['seq'], r['ms'][name] / r['best_dense_ms']) for r in sel if name in r['ms']]
      if pts:
        ax.plot(*zip(*pts), style, label=f'{name} (block_k {block_k})',
                alpha=1.0 if block_k == 128 else 0.4)
  ax.axhline(1.0, color='k', lw=0.8, label='fastest dense (cuDNN / tokamax)')
  ax.axhline(0.40, color='r', lw=0.8, ls=':', label='target at 65%, >= 8k')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('sequence length (batch x seq = 16k tokens)')
  ax.set_ylabel('forward time / fastest dense')
  ax.set_title(f"Block-sparse attention, {env['device']}\njax {env['jax']}, {env['date']}",
               fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=130)


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    plot(json.load(f), sys.argv[2])
