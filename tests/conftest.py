"""8 virtual CPU devices for every test; must run before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
    assert jax.device_count() == 8, "tests need 8 virtual CPU devices (XLA_FLAGS set too late?)"


def pytest_configure(config):
    """Measure this host's matmul peak (the MFU denominator, cached for every test) once, before any test
    or pytest-xdist worker runs: measured beside a busy worker it reads low and MFU passes 1."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has measured it
        return
    from picotron_jax.observe.flops import measure_matmul_peak, save_cpu_peak

    save_cpu_peak(measure_matmul_peak())
