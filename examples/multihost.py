"""Multi-host jattn on one machine: N local processes joined by jax.distributed.

    python examples/multihost.py                      # 2 processes x 4 CPU devices
    python examples/multihost.py --processes 4 --devices-per-process 2

Each process owns a few virtual CPU devices; together they form one mesh
(data x model x seq) over which the processes run sharded multi-head
attention, ring attention and a sharded SGD step on the same global arrays.
Process 0 checks every result against a single-device run. Collectives go
through gloo on 127.0.0.1. Every wait is bounded: a taken port, a process that
dies or one that hangs ends the run with a clear message, never a hang.

On a real cluster, drop the launcher: start one process per host with
``jax.distributed.initialize()`` (it reads the cluster's environment), keep
``run_checks`` as it is, and build the mesh from ``jax.devices()``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def port_is_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(('127.0.0.1', port))
    except OSError:
      return False
  return True


def run_checks(num_processes: int) -> dict:
  """Sharded computations over every process's devices vs one device."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  import jattn
  from jattn import sharding

  devices = len(jax.devices())
  mesh = sharding.make_mesh({'data': num_processes, 'model': 2, 'seq': -1})
  params = jattn.init_params(jax.random.key(0), 32, 4)
  x = jax.random.normal(jax.random.key(1), (2 * num_processes, 16, 32))
  q = jax.random.normal(jax.random.key(2), (2 * num_processes, 32, 4, 8))

  def put(tree, specs):
    """Global arrays from the host copy every process holds (same seeds)."""
    return jax.tree.map(
      lambda a, spec: jax.make_array_from_callback(
        a.shape, jax.sharding.NamedSharding(mesh, spec), lambda index: a[index]
      ),
      tree,
      specs,
    )

  def loss(p, x):
    return jnp.mean(jnp.square(jattn.multi_head_attention(p, x, is_causal=True)))

  def sgd_step(p, x):
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p, x))

  sharded_params = put(params, sharding.param_specs(params, mesh))
  sharded_x = put(x, sharding.activation_spec(mesh, heads=False))
  sharded_q = put(q, sharding.activation_spec(mesh))
  ring = lambda q: sharding.ring_attention(q, q, q, mesh=mesh, is_causal=True)
  results = {
    'multi_head': jax.jit(jattn.multi_head_attention)(sharded_params, sharded_x),
    'sgd_step': jax.jit(sgd_step)(sharded_params, sharded_x),
    'ring': jax.jit(ring)(sharded_q),
  }
  gathered = multihost_utils.process_allgather(results, tiled=True)

  local = jax.local_devices()[0]
  single = jax.device_put((params, x, q), local)
  expected = {
    'multi_head': jattn.multi_head_attention(single[0], single[1]),
    'sgd_step': sgd_step(single[0], single[1]),
    'ring': jattn.dot_product_attention(
      single[2], single[2], single[2], is_causal=True
    ),
  }
  errors = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(jnp.asarray(a) - b))), gathered, expected
  )
  worst = max(jax.tree.leaves(errors))
  return {
    'process': jax.process_index(),
    'devices': devices,
    'mesh': dict(mesh.shape),
    'max_abs_error': worst,
    'ok': worst < 1e-4,
  }


def child(args) -> None:
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + f' --xla_force_host_platform_device_count={args.devices_per_process}'
  )
  import jax

  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_num_cpu_devices', args.devices_per_process)
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{args.port}',
    num_processes=args.processes,
    process_id=args.process_id,
    initialization_timeout=args.timeout,
    heartbeat_timeout_seconds=max(10, args.timeout // 3),
    shutdown_timeout_seconds=30,
  )
  try:
    result = run_checks(args.processes)
  finally:
    jax.distributed.shutdown()
  print(json.dumps(result), flush=True)
  sys.exit(0 if result['ok'] else 3)


def launch(args) -> int:
  if args.port and not port_is_free(args.port):
    print(
      f'error: coordinator port 127.0.0.1:{args.port} is taken; pass '
      '--port 0 to pick a free one.',
      file=sys.stderr,
    )
    return 2
  port = args.port or free_port()
  base = [
    sys.executable,
    os.path.abspath(__file__),
    '--child',
    '--port',
    str(port),
    '--processes',
    str(args.processes),
    '--devices-per-process',
    str(args.devices_per_process),
    '--timeout',
    str(args.timeout),
  ]
  procs = [
    subprocess.Popen(
      base + ['--process-id', str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(args.processes)
  ]
  deadline = time.monotonic() + args.timeout
  failed = None
  while time.monotonic() < deadline:
    codes = [p.poll() for p in procs]
    dead = [i for i, c in enumerate(codes) if c not in (None, 0)]
    if dead:
      failed = f'process {dead[0]} exited with code {codes[dead[0]]}'
      break
    if all(c == 0 for c in codes):
      break
    time.sleep(0.2)
  else:
    failed = f'timed out after {args.timeout} s'
  for p in procs:
    if p.poll() is None:
      p.kill()
  outputs = [p.communicate() for p in procs]
  if failed:
    print(f'error: {failed}; the other processes were stopped.', file=sys.stderr)
    for i, (_, err) in enumerate(outputs):
      tail = '\n'.join(err.strip().splitlines()[-8:])
      if tail:
        print(f'--- process {i} stderr (tail) ---\n{tail}', file=sys.stderr)
    return 1
  for out, _ in outputs:
    print(out.strip().splitlines()[-1])
  print(f'all {args.processes} processes agree with the single-device run')
  return 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices-per-process', type=int, default=4)
  parser.add_argument('--port', type=int, default=0, help='0: pick a free one')
  parser.add_argument(
    '--timeout',
    type=int,
    default=120,
    help='seconds for the whole run (and for start-up)',
  )
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--process-id', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
  else:
    sys.exit(launch(args))


if __name__ == '__main__':
  main()
