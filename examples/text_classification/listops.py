"""ListOps, generated offline with the Long Range Arena generator's rules.

An expression is a tree: each node is a value 0-9 or an operator applied to
2..``max_args`` sub-expressions; the root is an operator and no node lies deeper
than ``max_depth``. Below the root a node is an operator with probability 0.25.
Operators: MIN, MAX, MED (median, rounded down as ``int(np.median)`` does) and SM
(sum mod 10). The label is the expression's value, so there are 10 classes.

Tokens keep the brackets: ``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9 tokens (an operator
with its opening bracket is one token, each ``]`` is one). LRA's released files
dropped the brackets' grouping; here the tree stays readable.
"""

from __future__ import annotations

import random
import statistics

OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')
CLOSE = ']'
DIGITS = tuple('0123456789')
OPERATOR_PROBABILITY = 0.25  # of a non-root node above max_depth


def _apply(operator: str, args: list[int]) -> int:
  if operator == '[MIN':
    return min(args)
  if operator == '[MAX':
    return max(args)
  if operator == '[MED':
    return int(statistics.median(args))
  if operator == '[SM':
    return sum(args) % 10
  raise ValueError(f'unknown ListOps operator {operator!r}')


def evaluate(tokens: list[str] | str) -> int:
  """The value of a ListOps expression given as tokens or a space-joined string."""
  if isinstance(tokens, str):
    tokens = tokens.split()
  stack: list[tuple[str, list[int]]] = []
  result = None
  for position, token in enumerate(tokens):
    if token in OPERATORS:
      stack.append((token, []))
    elif token == CLOSE:
      if not stack:
        raise ValueError(f'unbalanced {CLOSE!r} at token {position}')
      operator, args = stack.pop()
      value = _apply(operator, args)
      if stack:
        stack[-1][1].append(value)
      else:
        result = value
    elif token.isdigit() and len(token) == 1:
      if not stack:
        raise ValueError(f'value {token!r} outside any operator at token {position}')
      stack[-1][1].append(int(token))
    else:
      raise ValueError(f'unknown ListOps token {token!r} at token {position}')
  if stack or result is None:
    raise ValueError('unbalanced ListOps expression: an operator is never closed')
  return result


def _draw(rand: random.Random, max_depth: int, max_args: int, max_length: int):
  """One expression's tokens, or None as soon as it cannot end within
  ``max_length`` (each open operator still needs its missing arguments and
  its ``]``), which keeps rejection sampling cheap."""
  uniform = rand.random
  spread = max_args - 1  # 2..max_args arguments
  tokens = [OPERATORS[int(uniform() * 4)]]
  missing = [2 + int(uniform() * spread)]  # arguments still to draw, per open operator
  needed = missing[0] + 1  # tokens the open operators need at the least
  while missing:
    if not missing[-1]:
      tokens.append(CLOSE)
      missing.pop()
      needed -= 1
      continue
    missing[-1] -= 1
    needed -= 1
    if len(missing) + 1 < max_depth and uniform() < OPERATOR_PROBABILITY:
      arguments = 2 + int(uniform() * spread)
      tokens.append(OPERATORS[int(uniform() * 4)])
      missing.append(arguments)
      needed += arguments + 1
    else:
      tokens.append(DIGITS[int(uniform() * 10)])
    if len(tokens) + needed > max_length:
      return None
  return tokens


def generate(
  count: int,
  *,
  min_length: int,
  max_length: int,
  seed: int | str,
  max_depth: int = 10,
  max_args: int = 10,
) -> list[tuple[str, int]]:
  """``count`` (text, label) pairs with ``min_length..max_length`` tokens each.

  Expressions outside the length range are drawn again (as LRA does; one that
  must outgrow ``max_length`` is dropped as soon as that is certain). The
  result is a function of ``seed``.
  """
  if not 1 <= min_length <= max_length:
    raise ValueError(
      f'need 1 <= min_length <= max_length; got {min_length}, {max_length}.'
    )
  if min_length < 4 and max_length < 4:
    raise ValueError(f'a ListOps expression has at least 4 tokens; got {max_length}.')
  rand = random.Random(seed)
  examples = []
  while len(examples) < count:
    tokens = _draw(rand, max_depth, max_args, max_length)
    if tokens is not None and len(tokens) >= min_length:
      examples.append((' '.join(tokens), evaluate(tokens)))
  return examples
