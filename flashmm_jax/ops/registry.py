"""A name -> function table: how a config string picks a kernel."""


class Registry:
  """Implementations of one op, looked up by the name a config gives."""

  def __init__(self, op):
    self.op = op
    self._fns = {}

  def register(self, name):
    def add(fn):
      if name in self._fns:
        raise ValueError(f'{self.op} implementation {name!r} is already registered')
      self._fns[name] = fn
      return fn
    return add

  def get(self, name):
    if name not in self._fns:
      raise ValueError(f'Unknown {self.op} implementation {name!r}; '
                       f'valid: {sorted(self._fns)}')
    return self._fns[name]

  def names(self):
    return sorted(self._fns)
