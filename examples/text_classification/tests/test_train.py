"""The training loop end to end: a tiny run, kill-and-resume, sharded steps,
damaged checkpoints, non-finite loss, flags."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import batches
import config as config_lib
import main
import predict
import progress as progress_lib
import steps
import train
from checkpoints import Checkpoints

MAIN = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'main.py'
)

# A model and data small enough that a run takes seconds; one bucket, one shape.
TINY = [
  '--train_size', '512', '--val_size', '64', '--test_size', '64',
  '--listops_min_length', '8', '--listops_max_length', '24',
  '--bucket_width', '32', '--max_length', '32',
  '--num_layers', '1', '--embed_dim', '32', '--num_heads', '2', '--mlp_dim', '32',
  '--batch_size', '32', '--eval_batch_size', '64',
  '--learning_rate', '3e-3', '--warmup_steps', '5', '--log_every', '5',
  '--no-progress',
]  # fmt: skip


def subprocess_env(workdir):
  """A run in its own process: one device, and a compilation cache shared by
  the runs of one test (``workdir``'s parent), so a resumed run loads what
  the first one compiled (single-device programs only: no collectives)."""
  cache = os.path.join(os.path.dirname(os.path.abspath(workdir)), 'compiled')
  return dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )


def run_main(workdir, *flags):
  return subprocess.run(
    [sys.executable, MAIN, *TINY, '--workdir', str(workdir), *flags],
    capture_output=True,
    text=True,
    timeout=300,
    env=subprocess_env(workdir),
  )


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as file:
    records = [json.loads(line) for line in file]
  for record in records:
    record.pop('tokens_per_second', None)  # wall-clock, not a result
    record.pop('seconds', None)
  return records


def read_json(path):
  with open(path) as file:
    return json.load(file)


def final_params(workdir):
  config = config_lib.Config(**read_json(os.path.join(workdir, 'config.json')))
  _, state = steps.create(config, 18, 10)
  checkpoints = Checkpoints(str(workdir), 3)
  restored = checkpoints.restore(state)
  checkpoints.close()
  return restored


def test_tiny_run_trains_checkpoints_plots_and_predicts(tmp_path, capsys):
  workdir = tmp_path / 'run'
  main.main(
    [*TINY, '--workdir', str(workdir), '--num_steps', '60', '--eval_every', '30']
  )
  records = read_metrics(workdir)
  train_losses = [r['loss'] for r in records if r['split'] == 'train']
  assert train_losses[-1] < train_losses[0] - 0.2
  assert [r['step'] for r in records if r['split'] == 'validation'] == [30, 60]
  for name in (
    'curves.png',
    'attention.png',
    'summary.json',
    'vocab.json',
    'labels.json',
  ):
    assert (workdir / name).stat().st_size > 0, name
  summary = read_json(workdir / 'summary.json')
  assert summary['test_accuracy'] > summary['majority_class_test_accuracy']
  # One manager keeps the newest checkpoints and the best validated one.
  kept = sorted(int(step) for step in os.listdir(workdir / 'checkpoints'))
  assert summary['best_step'] in kept and kept[-1] == 60
  last_window = [r for r in records if r['split'] == 'train'][-1]
  assert summary['train_tokens'] == last_window['tokens'] > 0
  assert summary['train_tokens_per_second'] > 0
  assert 'test accuracy' in capsys.readouterr().out

  # A rerun of the finished run leaves it, and its summary, as they were.
  first = (workdir / 'summary.json').read_text()
  main.main(
    [*TINY, '--workdir', str(workdir), '--num_steps', '60', '--eval_every', '30']
  )
  out = capsys.readouterr().out
  assert (workdir / 'summary.json').read_text() == first
  assert 'holds a finished run' in out and ' 0 tokens/s' not in out

  probabilities = predict.predict(
    str(workdir), ['[MAX 2 9 [MIN 4 7 ] 0 ]', '[SM 1 1 ]']
  )
  assert len(probabilities) == 2 and set(probabilities[0]) == {
    str(i) for i in range(10)
  }
  assert all(abs(sum(p.values()) - 1.0) < 1e-4 for p in probabilities)
  main.main(['--workdir', str(workdir), '--predict', '[MAX 2 9 ]'])
  assert "'[MAX 2 9 ]' ->" in capsys.readouterr().out


def damage(directory):
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'wb') as file:
        file.write(b'\0garbage')


def save_states(directory, accuracies: dict, keep=2):
  checkpoints = Checkpoints(str(directory), keep=keep)
  for step, accuracy in accuracies.items():
    state = {'step': jnp.asarray(step), 'w': jnp.full((4,), float(step))}
    checkpoints.save(state, accuracy=accuracy)
  return checkpoints


TARGET = {'step': jnp.asarray(0), 'w': jnp.zeros((4,))}


def test_checkpoints_keep_the_newest_and_the_best(tmp_path):
  checkpoints = save_states(tmp_path, {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None})
  checkpoints.close()
  checkpoints = Checkpoints(str(tmp_path), keep=2)  # as a resumed run finds them
  assert sorted(checkpoints.manager.all_steps()) == [2, 4, 5]
  assert int(checkpoints.restore_best(TARGET)['step']) == 2
  assert int(checkpoints.restore(TARGET)['step']) == 5
  checkpoints.close()


def test_damaged_checkpoints_are_set_aside(tmp_path, capsys):
  save_states(tmp_path, {1: 0.9, 2: None}, keep=3).close()
  damage(tmp_path / 'checkpoints' / '2')  # the latest
  damage(tmp_path / 'checkpoints' / '1')  # the best, metrics included
  checkpoints = Checkpoints(str(tmp_path), keep=3)
  assert checkpoints.restore_best(TARGET) is None
  assert 'checkpoints/1 is damaged' in capsys.readouterr().err
  with pytest.raises(config_lib.UserError, match='could be read'):
    checkpoints.restore(TARGET)
  assert 'checkpoints/2 is damaged' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1.damaged', '2.damaged']
  checkpoints.close()


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  checkpoints = save_states(tmp_path, {1: None, 2: None}, keep=3)
  damage(tmp_path / 'checkpoints' / '2')
  restored = checkpoints.restore(TARGET)
  assert int(restored['step']) == 1 and float(restored['w'][0]) == 1.0
  assert 'checkpoints/2 is damaged' in capsys.readouterr().err
  # The redone step 2 is saved afresh.
  checkpoints.save({'step': jnp.asarray(2), 'w': jnp.full((4,), 7.0)})
  assert float(checkpoints.restore(TARGET)['w'][0]) == 7.0
  checkpoints.close()


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(
  tmp_path, monkeypatch
):
  healthy = steps.train_step

  def poisoned(task, state, batch, rng):  # the loss turns NaN after step 12
    state, sums = healthy(task, state, batch, rng)
    bad = state['step'] > 12
    return state, {**sums, 'loss_sum': jnp.where(bad, jnp.nan, sums['loss_sum'])}

  monkeypatch.setattr(steps, 'train_step', poisoned)
  flags = [*TINY, '--workdir', str(tmp_path), '--checkpoint_every', '5']
  with pytest.raises(SystemExit, match=r'not finite at step 13.*\(step 10\)'):
    main.main([*flags, '--num_steps', '40', '--eval_every', '10'])
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '5']
  state = final_params(tmp_path)
  assert int(state['step']) == 10
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_data_parallel_step_equals_single_device_step():
  assert jax.device_count() == 8
  config = config_lib.Config(
    num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, batch_size=16, model_axis=2
  )
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 24, 40)
  encoded = batches.Encoded(
    [rng.integers(3, 18, n).astype(np.int32) for n in lengths],
    rng.integers(0, 10, 40).astype(np.int32),
  )
  layout = batches.Layout.of(config, [encoded])
  rows = batches.pack(encoded.lengths, np.arange(40), layout.width, layout.slots)
  batch = batches.make_batch(encoded, rows[:16], 16, layout)
  results = []
  for devices, model_axis in (
    (jax.devices()[:1], 1),
    (jax.devices(), 1),
    (jax.devices(), 2),
  ):
    config.model_axis = model_axis
    task, state = steps.create(config, 18, 10)
    jitted = steps.jit_steps(task, state, steps.make_mesh(config, devices))
    state = jax.device_put(state, jitted.state_sharding)
    for step in range(2):
      state, metrics = jitted.train(
        state, jax.device_put(batch, jitted.batch_sharding), jax.random.key(step)
      )
    if model_axis == 2:  # heads and MLP hidden units really are split
      block = state['params']['blocks'][0]
      assert block['mlp_in']['kernel'].sharding.spec == P(None, 'model')
      assert block['attention']['query']['kernel'].sharding.spec == P(
        None, 'model', None
      )
      mu = state['opt_state'][1][0].mu['blocks'][0]['mlp_out']['kernel']
      assert mu.sharding.spec == P('model', None)  # Adam's moments follow
    results.append((jax.device_get(state), jax.device_get(metrics)))
  for state, metrics in results[1:]:
    jax.tree.map(
      # Adam turns float32 reduction-order noise in near-zero gradients into
      # updates of up to ~1e-5 (the learning rate is 2e-3).
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5),
      state,
      results[0][0],
    )
    np.testing.assert_allclose(
      metrics['loss_sum'], results[0][1]['loss_sum'], rtol=1e-5
    )


def test_help_describes_every_flag_and_its_allowed_values(capsys):
  with pytest.raises(SystemExit):
    main.parse(['--help'])
  text = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines
  for field in config_lib.Config.__dataclass_fields__.values():
    assert f'--{field.name}' in text
    assert config_lib.describe(field) in text, field.name
  for flag, allowed in [
    ('tokenizer', 'word, byte'),
    ('attention', 'default, flash, reference, xla, cudnn, flax'),
    ('positions', 'learned, sinusoidal'),
    ('pooling', 'cls, mean'),
    ('dtype', 'float32, bfloat16'),
  ]:
    assert f'--{flag} {{{allowed.replace(", ", ",")}}}' in text
    assert f'one of {allowed}' in text
  assert 'default: 60000' in text and '--predict' in text and 'lra_listops' in text
  assert 'Hugging Face' in text  # --dataset says what it takes


def test_progress_starts_after_compiling_and_shows_validation_once_there_is_one():
  config = config_lib.Config(num_steps=100)
  progress = progress_lib.Progress(config, best=None)
  progress.step(41)  # the first step, compiled: the bar starts here
  assert progress.bar.n == 41
  record = {'split': 'train', 'loss': 1.0, 'accuracy': 0.5, 'tokens_per_second': 9.0}
  progress.show(record)
  assert 'best_val' not in progress.postfix
  progress.step(60)  # the next record
  progress.show({'split': 'validation', 'accuracy': 0.25, 'loss': 2.0})
  progress.show(record)
  assert progress.postfix['best_val'] == '0.250' and progress.bar.n == 60
  resumed = progress_lib.Progress(config, best=0.3)
  resumed.step(61)
  resumed.show(record)
  assert resumed.postfix['best_val'] == '0.300'


def test_presets_and_flags_combine():
  config, _ = main.parse(['--preset', 'lra_listops', '--num_layers', '2'])
  assert (config.num_layers, config.embed_dim, config.listops_max_length) == (
    2,
    512,
    2000,
  )


def test_resuming_with_other_settings_is_refused(tmp_path):
  config = config_lib.Config(workdir=str(tmp_path))
  with open(tmp_path / 'config.json', 'w') as file:
    json.dump({**config.__dict__, 'embed_dim': 32}, file)
  with pytest.raises(config_lib.UserError, match='--embed_dim 32 -> 64'):
    train.train_and_evaluate(config)


def test_bad_flags_name_the_flag():
  with pytest.raises(
    ValueError, match='--embed_dim 30 must be a multiple of --num_heads'
  ):
    config_lib.validate(config_lib.Config(embed_dim=30, num_heads=4))
  with pytest.raises(ValueError, match='--pooling'):
    config_lib.validate(config_lib.Config(pooling='max'))
  with pytest.raises(ValueError, match='--batch_size 12 must be a multiple of the 8'):
    steps.make_mesh(config_lib.Config(batch_size=12))
