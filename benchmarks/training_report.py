r"""Collects a training run's throughput and its eval table into JSON + markdown.

  python benchmarks/training_report.py --workdir=DIR --out=docs/spine_small_pro

Reads DIR/train_summary.json (written by train.py) and DIR/eval/results.json
(written by eval.py); adds device, versions and date.
"""

import datetime
import json
import pathlib

from absl import app
from absl import flags
import flax
import jax
import optax

_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir that eval.py has scored.')
_OUT = flags.DEFINE_string('out', None, 'Output stem: writes OUT.json and OUT.md.')
flags.mark_flags_as_required(['workdir', 'out'])


def collect(workdir):
  workdir = pathlib.Path(workdir)
  train = json.loads((workdir / 'train_summary.json').read_text())
  evals = json.loads((workdir / 'eval' / 'results.json').read_text())
  return {
      'date': datetime.date.today().isoformat(),
      'device': f"{train['device_count']} x {train['device_kind']}",
      'versions': {'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__},
      'train': train,
      'eval': evals,
  }


def markdown(report):
  t, e = report['train'], report['eval']
  mfu = f"{100 * t['median_mfu']:.1f}%" if 'median_mfu' in t else 'n/a'
  lines = [
      f"Device: {report['device']}; jax {report['versions']['jax']}, flax "
      f"{report['versions']['flax']}, optax {report['versions']['optax']}; {report['date']}.",
      '',
      '| steps | wall time | steps/s | tokens/s | MFU | final loss | mean accuracy |',
      '| --- | --- | --- | --- | --- | --- | --- |',
      f"| {t['final_step']} | {t['wall_seconds'] / 60:.1f} min | {t['median_steps_per_s']:.2f} | "
      f"{t['median_tokens_per_s'] / 1e3:.0f}k | {mfu} | {t['final_loss']:.4f} | "
      f"{100 * e['mean']:.1f} |",
      '', '| task | metric | score |', '| --- | --- | --- |',
  ]
  lines += [f"| {k} | {v['metric']} | {100 * v['score']:.1f} |" for k, v in e['tasks'].items()]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  report = collect(_WORKDIR.value)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix('.json').write_text(json.dumps(report, indent=2))
  out.with_suffix('.md').write_text(markdown(report))
  print(markdown(report))


if __name__ == '__main__':
  app.run(main)
