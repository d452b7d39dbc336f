"""benchmarks/cta_spread.py's trace reading on a made-up Mosaic GPU trace: two
CTAs on two SMs, one looping 10 us, the other 6 us from 1 us later."""

from benchmarks import cta_spread


def _range(name, sm, tid, begin, end):
  return [dict(name=name, ph='B', ts=begin, pid=sm + 1, tid=tid),
          dict(name=name, ph='E', ts=end, pid=sm + 1, tid=tid)]


def test_spread_of_two_ctas():
  events = (_range('Init', 0, 1, 100.0, 100.5) + _range('blocks', 0, 1, 101.0, 111.0)
            + _range('Init', 3, 4, 101.0, 101.5) + _range('blocks', 3, 4, 102.0, 108.0))
  named = cta_spread.ranges(events)
  assert sorted(named) == ['Init', 'blocks']
  assert named['blocks'] == [(0, 1, 101.0, 111.0), (3, 4, 102.0, 108.0)]
  s = cta_spread.spread(named)['blocks']
  assert (s['count'], s['sms']) == (2, 2)
  assert s['begin'] == dict(min=1.0, median=1.5, max=2.0)   # from the first Init
  assert s['end'] == dict(min=8.0, median=9.5, max=11.0)
  assert s['duration'] == dict(min=6.0, median=8.0, max=10.0)
  assert s['busy'] == 8.0 / 11.0   # mean loop time over first begin .. last end
  table = cta_spread.markdown([dict(batch=8, cache=64, ranges=cta_spread.spread(named))],
                              dict(device='cpu', jax='x', date='today'))
  assert '| 8 x 64 | `blocks` | 2 (2) | 1.0 / 1.5 / 2.0 | 8.0 / 9.5 / 11.0 |' in table
