"""The training example under faults: kill -9, damaged files, refused flags,
user errors as one line and exit status 2."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import (
  MAIN,
  TINY,
  damage,
  final_params,
  read_json,
  read_metrics,
  run_main,
  subprocess_env,
)

import config as config_lib
import main
import plots
import train
import workdir as workdir_lib
from checkpoints import Checkpoints


@pytest.fixture
def no_plots(monkeypatch):
  """In-process runs here test resuming, not plots (test_train's tiny run
  does): a finished run skips them."""
  monkeypatch.setattr(plots, 'write_all', lambda *args: None)


def start_and_interrupt(workdir, flags, sig):
  """Starts a run and freezes it (SIGSTOP) as soon as its step-20 checkpoint
  exists, so that ``sig`` lands before the next one whatever the machine's
  speed; returns the finished process and its output."""
  process = subprocess.Popen(
    [sys.executable, MAIN, *TINY, '--workdir', str(workdir), *flags],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=subprocess_env(workdir),
  )
  deadline = time.monotonic() + 240  # a guard, not a synchronisation
  while not (workdir / 'checkpoints' / '20').exists() and process.poll() is None:
    assert time.monotonic() < deadline, 'no checkpoint appeared'
    time.sleep(0.005)
  process.send_signal(signal.SIGSTOP)
  assert not (workdir / 'checkpoints' / '30').exists()
  process.send_signal(sig)
  process.send_signal(signal.SIGCONT)
  out, err = process.communicate(timeout=120)
  return process, out, err


def test_sigterm_and_kill_9_then_resume_match_an_uninterrupted_run(tmp_path):
  flags = ['--num_steps', '50', '--eval_every', '20', '--checkpoint_every', '10']
  # The uninterrupted run goes on beside the first interrupted one.
  whole = subprocess.Popen(
    [sys.executable, MAIN, *TINY, '--workdir', str(tmp_path / 'whole'), *flags],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=subprocess_env(tmp_path / 'whole'),
  )

  # SIGTERM: the run finishes its logging window, saves and exits.
  workdir = tmp_path / 'term'
  process, out, err = start_and_interrupt(workdir, flags, signal.SIGTERM)
  whole_err = whole.communicate(timeout=300)[1]
  assert whole.returncode == 0, whole_err[-3000:]
  assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert 'checkpoint saved' in out
  stopped_at = max(int(step) for step in os.listdir(workdir / 'checkpoints'))
  assert 20 <= stopped_at < 50
  resumed = run_main(workdir, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming at step {stopped_at}' in resumed.stdout

  # kill -9 between two checkpoints, and a record torn in mid-write.
  killed = tmp_path / 'kill'
  process, _, _ = start_and_interrupt(killed, flags, signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL
  with open(killed / 'metrics.jsonl', 'a') as file:
    file.write('{"step": 31, "split": "tra')
  resumed = run_main(killed, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'is a partial record; dropped' in resumed.stderr

  expected = final_params(tmp_path / 'whole')
  whole_summary = read_json(tmp_path / 'whole' / 'summary.json')
  for run in (workdir, killed):
    assert read_metrics(run) == read_metrics(tmp_path / 'whole')
    jax.tree.map(np.testing.assert_array_equal, final_params(run), expected)
  # The resumed run's summary adds up its parts: every token trained once.
  parts = read_json(workdir / 'summary.json')
  assert parts['train_tokens'] == whole_summary['train_tokens'] > 0
  with open(workdir / 'metrics.jsonl') as file:
    records = [json.loads(line) for line in file if '"train"' in line]
  first_part = [r['seconds'] for r in records if r['step'] <= stopped_at]
  second_part = [r['seconds'] for r in records if r['step'] > stopped_at]
  assert 0 < first_part[-1] < second_part[0] < parts['wall_seconds']


@pytest.mark.parametrize('best', [5, 10])
def test_damaged_best_checkpoint_falls_back_to_the_latest(
  best, tmp_path, capsys, monkeypatch, no_plots
):
  # Which evaluation is best is set here, so both ways of falling back run.
  evaluate = train.evaluate

  def evaluate_with_best(steps, state, *args):
    result = evaluate(steps, state, *args)
    return {**result, 'accuracy': 0.9 if int(state['step']) == best else 0.5}

  monkeypatch.setattr(train, 'evaluate', evaluate_with_best)
  flags = [*TINY, '--workdir', str(tmp_path), '--eval_every', '5']
  main.main([*flags, '--num_steps', '10'])
  assert read_json(tmp_path / 'summary.json')['best_step'] == best
  damage(tmp_path / 'checkpoints' / str(best))
  os.remove(tmp_path / 'summary.json')  # as if killed while testing
  capsys.readouterr()
  main.main([*flags, '--num_steps', '10'])  # it is tested again
  captured = capsys.readouterr()
  assert f'checkpoints/{best} is damaged' in captured.err
  if best == 5:  # set aside: the best readable one (the latest) is tested
    assert read_json(tmp_path / 'summary.json')['best_step'] == 10
    return
  # The latest was the best: steps 6-10 are redone from step 5, and a
  # running one goes on.
  assert 'resuming at step 5' in captured.out
  assert read_json(tmp_path / 'summary.json')['best_step'] == 10
  main.main([*flags, '--num_steps', '15'])
  assert int(final_params(tmp_path)['step']) == 15


def test_a_second_signal_during_a_checkpoint_ends_the_run_after_it(
  tmp_path, monkeypatch, capsys, no_plots
):
  # Both signals land while step 10 is being saved: the save completes,
  # then one line says how to resume, and the resumed run ends as usual.
  save = Checkpoints.save

  def save_under_signals(self, state, **kwargs):
    if int(state['step']) == 10:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGINT)
    save(self, state, **kwargs)

  monkeypatch.setattr(Checkpoints, 'save', save_under_signals)
  flags = [*TINY, '--workdir', str(tmp_path), '--num_steps', '20', '--eval_every', '20']
  with pytest.raises(SystemExit) as info:
    main.main([*flags, '--checkpoint_every', '10'])
  assert info.value.code == 128 + signal.SIGTERM
  out = capsys.readouterr().out
  assert 'stopped by signal 15 at once (a second signal). Run the same' in out
  assert 'Traceback' not in out
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10']
  monkeypatch.setattr(Checkpoints, 'save', save)
  main.main([*flags, '--checkpoint_every', '10'])
  assert 'resuming at step 10' in capsys.readouterr().out
  assert read_json(tmp_path / 'summary.json')['steps'] == 20


def test_a_signal_while_testing_ends_the_run_with_one_line(
  tmp_path, monkeypatch, capsys, no_plots
):
  flags = [*TINY, '--workdir', str(tmp_path), '--num_steps', '10', '--eval_every', '10']
  test = train.test

  def test_under_signal(run, state, window):
    os.kill(os.getpid(), signal.SIGTERM)
    return test(run, state, window)

  monkeypatch.setattr(train, 'test', test_under_signal)
  with pytest.raises(SystemExit) as info:
    main.main(flags)
  assert info.value.code == 128 + signal.SIGTERM
  out = capsys.readouterr().out
  assert 'stopped by signal 15 while testing (training is finished).' in out
  assert not (tmp_path / 'summary.json').exists()
  monkeypatch.setattr(train, 'test', test)
  main.main(flags)  # the rerun tests the finished training
  assert 'resuming at step 10' in capsys.readouterr().out
  assert read_json(tmp_path / 'summary.json')['steps'] == 10


@pytest.mark.parametrize(
  'flag, saved, given',
  [
    ('dropout_rate', 0.3, 0.1),
    ('attention_dropout_rate', 0.2, 0.0),
    ('batch_size', 64, 32),
    ('learning_rate', 1e-3, 2e-3),
    ('embed_dim', 32, 64),
  ],
)
def test_resuming_with_a_flag_that_changes_the_result_is_refused(
  tmp_path, flag, saved, given
):
  config = config_lib.Config(workdir=str(tmp_path), **{flag: given})
  with open(tmp_path / 'config.json', 'w') as file:
    json.dump({**config.__dict__, flag: saved}, file)
  with pytest.raises(config_lib.UserError, match=rf'--{flag} {saved!r} -> {given!r}'):
    train.train_and_evaluate(config)


def test_flags_that_steer_the_run_may_change(tmp_path):
  config = config_lib.Config(workdir=str(tmp_path))
  path = tmp_path / 'config.json'
  with open(path, 'w') as file:
    json.dump({**config.__dict__, 'num_steps': 10, 'log_every': 7}, file)
  workdir_lib.check_config(config)


def test_a_data_error_is_one_line_and_status_2(tmp_path):
  bad = tmp_path / 'bad.csv'
  bad.write_bytes(b'text,label\nfine,pos\ncaf\xe9,neg\n')
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [sys.executable, MAIN, '--train_file', str(bad), '--workdir', str(workdir)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: {bad}:3: not UTF-8 (byte 0xe9 at column 4); save the '
                    'file as UTF-8.']  # fmt: skip
  assert not workdir.exists()  # a failed start leaves no workdir behind


def test_user_errors_exit_2(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  cases = [
    (['--workdir', str(blocker / 'run')], 'cannot be written'),
    (['--workdir', str(tmp_path / 'w'), '--embed_dim', '31'], '--embed_dim 31'),
    (['--workdir', str(tmp_path / 'w'), '--train_file', 'nope.csv'], 'no such file'),
    (['--workdir', str(tmp_path / 'empty'), '--predict', 'x'], 'lacks config.json'),
  ]
  for flags, message in cases:
    with pytest.raises(SystemExit) as info:
      main.main([*TINY, '--train_size', '64', '--num_steps', '1', *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err, err
  assert not (tmp_path / 'w').exists()
