"""The generation example: it trains, samples through both caches as by
recomputation, resumes identically, and refuses bad flags in one line."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import decoder
import sampling
import settings as settings_lib
import stdlib_bytes
import training

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  max_files=30, length=64, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2,
  mlp_dim=64, batch_size=4, num_steps=6, eval_every=3, eval_rows=4, warmup_steps=2,
  progress=False,
)  # fmt: skip


def tiny(**changes) -> settings_lib.Settings:
  return settings_lib.Settings(**{**TINY, **changes})


@pytest.fixture(scope='module')
def data():
  return stdlib_bytes.splits(TINY['max_files'])


def test_rows_keep_documents_apart(data):
  train = data['train']
  boundary = int(np.argmax(np.diff(train.docs) != 0))  # last byte of file 0
  rows = train.rows(np.array([boundary - 3]), 8)
  np.testing.assert_array_equal(rows['segment_ids'][0], [0] * 4 + [1] * 4)
  np.testing.assert_array_equal(rows['positions'][0], [*range(4), *range(4)])
  assert rows['inputs'][0, 3] == stdlib_bytes.END
  np.testing.assert_array_equal(rows['weights'][0], [1, 1, 1, 0, 1, 1, 1, 1])
  # The END byte's target is the next file's first byte: not scored.
  rows = train.rows(np.array([boundary - 4]), 8)
  assert rows['weights'][0, 4] == 0 and rows['weights'].sum() == 7


def test_greedy_bytes_are_the_same_through_either_cache_and_by_recomputing():
  model = decoder.Decoder(tiny(), nnx.Rngs(3))
  prompts = [list(b'def f(x'), list(b'#')]  # ragged: 7 and 1 bytes
  key = jax.random.key(0)
  ragged = sampling.paged(model, prompts, 10, key)
  for b, prompt in enumerate(prompts):  # each prompt alone gives the same
    one = jnp.asarray([prompt], jnp.int32)
    np.testing.assert_array_equal(sampling.dense(model, one, 10, key)[0], ragged[b])
    np.testing.assert_array_equal(sampling.recompute(model, one, 10, key)[0], ragged[b])


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(1), 400)
  draw = lambda **kw: np.array(
    [int(sampling.choose(logits, k, 1.0, **kw)[0]) for k in keys[:200]]
  )
  assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(top_k=0, top_p=0.7)) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert int(sampling.choose(logits, keys[0], 0.0, 0, 1.0)[0]) == 0


def test_training_lowers_the_loss_and_resumes_identically(data, tmp_path):
  whole = tmp_path / 'whole'
  _, state, records = training.train(tiny(), data, str(whole))
  assert [r['step'] for r in records] == [3, 6]
  trainer = training.trainer_for(tiny())
  batch = jax.tree.map(jnp.asarray, training.batch_of_step(data['train'], tiny(), 0))
  assert float(trainer.loss(state['params'], batch)) < float(
    trainer.loss(trainer.init_state()['params'], batch)
  )
  # Interrupted after step 3's checkpoint, then rerun: the same end.
  parts = tmp_path / 'parts'
  training.train(tiny(), data, str(parts), until=3)
  _, resumed, resumed_records = training.train(tiny(), data, str(parts))
  jax.tree.map(np.testing.assert_array_equal, resumed['params'], state['params'])
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(resumed_records) == strip(records)


def test_a_tiny_run_writes_its_summary(tmp_path):
  spec = importlib.util.spec_from_file_location(
    'generation_main', os.path.join(HERE, 'main.py')
  )
  main = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(main)
  flags = [f'--{k}={v}' for k, v in TINY.items() if k != 'progress']
  settings = main.parse(
    [*flags, '--no-progress', '--new_tokens=8', f'--workdir={tmp_path}']
  )
  summary = main.run(settings)
  assert summary['validation_bits_per_byte'] > 0
  assert summary['decode_bytes_per_s_cache'] > 0
  assert os.path.exists(tmp_path / 'plots.png')
  with open(tmp_path / 'summary.json') as file:
    assert json.load(file)['baselines']['bigram'] > 0


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--num_heads', '5'], 'multiple of --num_heads'),
    (['--top_p', '0'], '--top_p in (0, 1]'),
    (['--new_tokens', '500'], 'at most --length'),
    (['--num_layers', 'x'], "invalid int value: 'x'"),
    (['--nonsense'], 'unrecognized arguments'),
    (['--max_files', '2'], '--max_files 2 leaves the'),
  ],
)
def test_bad_flags_are_one_line(flags, message):
  result = subprocess.run(
    [sys.executable, os.path.join(HERE, 'main.py'), *flags],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1 and message in result.stderr
