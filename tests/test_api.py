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
    code = "import sys, xhcidbg; print(any(m.startswith('xhcidbg.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
