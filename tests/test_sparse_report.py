"""benchmarks/sparse_report.py: the rule picked on sparsity alone, the flags it
hands the joint stage, and the report's numbers, on hand-made eval results."""

import json

import pytest

from benchmarks import sparse_report

TASKS = ('vqa_color', 'caption')


def results(scores, sparsity=None, selection=None):
  r = dict(tasks={t: dict(score=s) for t, s in zip(TASKS, scores)},
           mean=sum(scores) / len(scores))
  if sparsity is not None:
    r['sparsity'] = {'sparsity/overall': sparsity, 'sparsity/layer_0': sparsity}
    for t in r['tasks'].values():
      t['sparsity'] = {'sparsity/overall': sparsity}
    r['selection'] = selection
  return r


def write(path, r):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(r))
  return str(path)


@pytest.fixture
def sweep_dir(tmp_path):
  for name, sparsity, cov in (('threshold0.0_coverage0.5', 0.75, 0.5),
                              ('threshold0.0_coverage0.6', 0.68, 0.6),
                              ('threshold0.0_coverage0.8', 0.50, 0.8)):
    write(tmp_path / 'eval' / name / 'results.json',
          results([0.8, 0.9], sparsity, dict(threshold=0.0, top_k=0, coverage=cov)))
  return tmp_path / 'eval'


def test_pick_takes_the_densest_rule_reaching_the_sparsity(sweep_dir):
  assert sparse_report.pick(0.62, str(sweep_dir)) == 'threshold0.0_coverage0.6'
  assert sparse_report.pick(0.70, str(sweep_dir)) == 'threshold0.0_coverage0.5'
  with pytest.raises(SystemExit, match='reaches sparsity 0.9'):
    sparse_report.pick(0.9, str(sweep_dir))


def test_flags_name_the_rule_a_result_was_scored_with(sweep_dir):
  path = sweep_dir / 'threshold0.0_coverage0.6' / 'results.json'
  assert sparse_report.flags(sparse_report.load(str(path))['selection']) == (
      '--config.model.sparse.threshold=0.0 --config.model.sparse.top_k=0 '
      '--config.model.sparse.coverage=0.6')


def test_cli_gives_a_rules_flags_and_sweep_directory(capsys, monkeypatch):
  # The joint stage takes its rule from these when JOINT_RULE skips the gate's sweep.
  for command, expected in (
      ('rule_flags', '--config.model.sparse.threshold=0.0 --config.model.sparse.coverage=0.6'),
      ('name', 'threshold0.0_coverage0.6')):
    monkeypatch.setattr('sys.argv', ['sparse_report.py', command, 'threshold=0,coverage=0.6'])
    sparse_report.main()
    assert capsys.readouterr().out.strip() == expected
  monkeypatch.setattr('sys.argv', ['sparse_report.py', 'rule_flags', 'coverage=0.6,k=3'])
  with pytest.raises(ValueError, match="'k=3' must be KEY=VALUE"):
    sparse_report.main()


def test_report_compares_per_task_and_plots_the_curves(tmp_path, sweep_dir):
  dense = write(tmp_path / 'dense.json', results([0.9, 0.8]))
  sparse = write(tmp_path / 'sparse.json', results(
      [0.85, 0.83], 0.68, dict(threshold=0.0, top_k=0, coverage=0.6)))
  ref = write(tmp_path / 'ref.json', results([0.5, 0.5]))
  stem = str(tmp_path / 'report')
  sparse_report.report(stem, dense, sparse, [('joint', str(sweep_dir))], [('before', ref)],
                       dense_label='dense, 2000 steps')
  out = json.loads((tmp_path / 'report.json').read_text())
  assert [round(r['delta_points'], 6) for r in out['rows']] == [-5.0, 3.0]
  assert out['summary']['delta_points'] == pytest.approx(-1.0)
  assert out['references'] == {'before': 0.5}
  assert [p['sparsity'] for p in out['curves']] == pytest.approx([50.0, 68.0, 75.0])
  md = (tmp_path / 'report.md').read_text()
  assert '| **mean** | **85.0** | **84.0** | **-1.0** | **68.0** |' in md
  assert (tmp_path / 'report.png').stat().st_size > 0


def test_report_pairs_per_example_scores_for_a_standard_error(tmp_path):
  def per_example(*tasks):
    r = results([sum(t) / len(t) for t in tasks])
    for task, scores in zip(TASKS, tasks):
      r['tasks'][task].update(scores=list(scores), n=len(scores))
    return r
  dense = per_example([1, 1, 0, 0], [1, 1, 1, 1])
  sparse = per_example([1, 0, 1, 0], [1, 1, 1, 0])
  out = sparse_report.compare(dense, sparse)
  # Task 1: differences 0, -1, 1, 0 -> var 2/3 (ddof 1), over 4 examples -> s.e. 0.408.
  # Task 2: 0, 0, 0, -1 -> var 1/4, /4 -> 0.25. Mean over 2 tasks: sqrt(1/6 + 1/16) / 2.
  assert [r['delta_se'] for r in out['rows']] == pytest.approx([40.82, 25.0], abs=0.01)
  assert out['summary']['delta_se'] == pytest.approx(100 * (1 / 6 + 1 / 16) ** 0.5 / 2)
  md = sparse_report.markdown(out)
  assert 'delta (points, ± paired s.e.)' in md and '| vqa_color | 50.0 | 50.0 | +0.0 ± 40.8 |' in md
  # Results from before per-example scores: no standard error, the same table otherwise.
  assert sparse_report.compare(results([0.5, 1.0]), sparse)['summary']['delta_se'] is None
  shorter = per_example([1, 0, 1], [1, 1, 1])
  with pytest.raises(ValueError, match='task vqa_color: 4 dense and 3 sparse'):
    sparse_report.compare(dense, shorter)

