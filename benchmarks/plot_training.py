r"""Plots a run's TensorBoard scalars (loss, token accuracy) against steps.

  python benchmarks/plot_training.py --events=WORKDIR/tb --out=docs/results/curve.png
"""

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from tensorboard.backend.event_processing import event_accumulator

_EVENTS = flags.DEFINE_string('events', None, 'An event file or a tb/ directory.')
_OUT = flags.DEFINE_string('out', None, 'PNG to write.')
_TITLE = flags.DEFINE_string('title', '', 'Figure title (device, versions, date).')
flags.mark_flags_as_required(['events', 'out'])

PANELS = (('train/loss', 'answer-token loss', 'log'), ('train/token_accuracy', 'token accuracy', 'linear'))


def main(argv):
  del argv
  acc = event_accumulator.EventAccumulator(_EVENTS.value)
  acc.Reload()
  fig, axes = plt.subplots(1, len(PANELS), figsize=(10, 3.6))
  for ax, (tag, label, scale) in zip(axes, PANELS):
    events = acc.Scalars(tag)
    ax.plot([e.step for e in events], [e.value for e in events])
    ax.set(xlabel='step', ylabel=label, yscale=scale)
    ax.grid(alpha=0.3)
  fig.suptitle(_TITLE.value, fontsize=9)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)


if __name__ == '__main__':
  app.run(main)
