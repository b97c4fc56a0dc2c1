"""The public Python API is importable from `xhcidbg` and works as the README shows."""
import subprocess
import sys

import xhcidbg


def test_every_public_name_resolves():
    for name in xhcidbg.__all__:
        assert getattr(xhcidbg, name).__name__ == name


def test_the_readme_example_enumerates_a_tablet():
    bus = xhcidbg.InProcessBus()
    bus.controller.attach(xhcidbg.Tablet())
    dev = xhcidbg.XhciDriver(bus).start().enumerate(1)
    assert dev.product == "xhcidbg USB Tablet"


def test_importing_the_package_loads_no_controller():
    # only the few lines that load names on first use
    code = "import sys, xhcidbg; print(sorted(m for m in sys.modules if m.startswith('xhcidbg')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['xhcidbg', 'xhcidbg._lazy']"


def test_one_device_module_loads_without_every_device():
    code = ("import sys, xhcidbg.devices.base as b; print(sorted(m for m in sys.modules"
            " if m.startswith('xhcidbg.devices.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['xhcidbg.devices.base']"
