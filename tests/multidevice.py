"""Run a test module's multi-device cases in a subprocess with N fake JAX host devices.

``XLA_FLAGS=--xla_force_host_platform_device_count`` only acts before JAX creates its CPU backend,
which other test modules of the same pytest process have already done. So a module registers its
cases with ``@case``, calls ``main()`` under ``if __name__ == "__main__"``, and its pytest tests
read the results of one bounded subprocess run (``run_cases``): one JAX start-up per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

MARKER = "MULTIDEVICE-RESULTS "


def case(registry: dict):
    """Decorator: register a zero-argument case function under its name."""
    def register(fn):
        registry[fn.__name__] = fn
        return fn
    return register


def main(registry: dict, num_devices: int) -> None:
    """Run every case (in this fresh process), print {name: "ok" | traceback} as one JSON line."""
    import jax

    results = {}
    if jax.device_count() != num_devices:
        results = {name: f"expected {num_devices} devices, got {jax.device_count()}" for name in registry}
    else:
        for name, fn in registry.items():
            try:
                fn()
                results[name] = "ok"
            except Exception:  # reported to the pytest side, which fails that case
                results[name] = traceback.format_exc()
    print(MARKER + json.dumps(results), flush=True)


def run_cases(script: str, num_devices: int, timeout_s: float) -> dict:
    """Run ``script`` with ``num_devices`` host devices (bounded in time); returns its results."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=os.path.dirname(os.path.abspath(script)))
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"{script} exited with {proc.returncode} and no results:\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")
