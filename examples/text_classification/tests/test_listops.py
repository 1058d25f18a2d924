"""The ListOps generator: values, lengths, determinism."""

import pytest

import listops


@pytest.mark.parametrize(
  'expression, value',
  [
    ('[MAX 2 9 3 ]', 9),
    ('[MIN 4 7 ]', 4),
    ('[MED 1 8 3 ]', 3),
    ('[MED 1 2 3 4 ]', 2),  # the median 2.5 rounds down
    ('[MED 9 0 ]', 4),
    ('[SM 7 8 9 ]', 4),  # 24 mod 10
    ('[MAX 2 9 [MIN 4 7 ] 0 ]', 9),
    ('[SM [MAX 2 5 ] [MIN 8 6 ] [MED 1 9 5 ] ]', 6),  # 5 + 6 + 5 = 16
    ('[MIN [MAX [SM 9 9 ] 1 ] [MED 7 7 8 ] 9 ]', 7),  # min(max(8, 1), 7, 9)
  ],
)
def test_evaluate_hand_worked(expression, value):
  assert listops.evaluate(expression) == value


@pytest.mark.parametrize(
  'expression', ['[MAX 2 9', '2 ]', '[MAX 2 ] ]', '[MAX 2 x ]', '7', '[MAX 12 3 ]']
)
def test_evaluate_rejects_malformed(expression):
  with pytest.raises(ValueError):
    listops.evaluate(expression)


def test_generate_lengths_labels_and_rules():
  examples = listops.generate(300, min_length=16, max_length=64, seed=1)
  assert len(examples) == 300
  for text, label in examples:
    tokens = text.split()
    assert 16 <= len(tokens) <= 64
    assert tokens[0] in listops.OPERATORS and tokens[-1] == listops.CLOSE
    assert label == listops.evaluate(tokens)
    assert all(
      t in listops.OPERATORS or t == listops.CLOSE or t.isdigit() for t in tokens
    )
  assert {label for _, label in examples} == set(range(10))
  assert {t.split()[0] for t, _ in examples} == set(listops.OPERATORS)


def test_generate_depth_and_arguments():
  for text, _ in listops.generate(
    200, min_length=4, max_length=200, seed=2, max_depth=3
  ):
    depth, deepest, args = 0, 0, []
    for token in text.split():
      if token in listops.OPERATORS:
        depth += 1
        deepest = max(deepest, depth)
        if args:
          args[-1] += 1
        args.append(0)
      elif token == listops.CLOSE:
        depth -= 1
        assert 2 <= args.pop() <= 10
      else:
        args[-1] += 1
    assert deepest <= 3


def test_generate_is_deterministic_in_seed():
  first = listops.generate(50, min_length=16, max_length=128, seed=7)
  assert first == listops.generate(50, min_length=16, max_length=128, seed=7)
  assert first != listops.generate(50, min_length=16, max_length=128, seed=8)


def test_generate_rejects_bad_range():
  with pytest.raises(ValueError, match='min_length'):
    listops.generate(1, min_length=20, max_length=10, seed=0)
