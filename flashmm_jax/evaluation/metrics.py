"""Per-task answer metrics: exact match, and a set-F1 for captions."""

import re


def normalize(text):
  """Lowercase, collapse spaces, drop trailing punctuation."""
  return re.sub(r'\s+', ' ', text.strip().lower()).strip(' .?!')


def exact_match(prediction, answer):
  return float(normalize(prediction) == normalize(answer))


def caption_items(text):
  """'red circle, blue square' -> {'red circle', 'blue square'}."""
  return {normalize(item) for item in text.split(',') if normalize(item)}


def caption_f1(prediction, answer):
  """F1 between the predicted and reference object lists, order-free."""
  pred, ref = caption_items(prediction), caption_items(answer)
  if not pred and not ref:
    return 1.0
  hits = len(pred & ref)
  if not hits:
    return 0.0
  precision, recall = hits / len(pred), hits / len(ref)
  return 2 * precision * recall / (precision + recall)


METRICS = {'exact': exact_match, 'caption': caption_f1}


def score(metric, prediction, answer):
  if metric not in METRICS:
    raise ValueError(f'Unknown metric {metric!r}; valid: {sorted(METRICS)}')
  return METRICS[metric](prediction, answer)
