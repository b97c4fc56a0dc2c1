"""Without network and without a cached kit: a clear error naming what is missing; tests skip
outside CI and fail under CI=true."""
import pytest

from xhcidbg.guestkit import cache, ensure_kernel, ensure_qemu
from xhcidbg.guestkit.report import OfflineError
from xhcidbg.guestkit.testing import guest_kit


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    monkeypatch.setenv("XHCIDBG_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    monkeypatch.setenv("PATH", str(tmp_path))          # no system QEMU either
    monkeypatch.delenv("XHCIDBG_QEMU", raising=False)
    cache.qemu_archive.cache_clear()
    cache.guest_archive.cache_clear()
    yield
    cache.qemu_archive.cache_clear()
    cache.guest_archive.cache_clear()


def test_offline_errors_name_what_is_missing(offline):
    with pytest.raises(OfflineError, match=r"missing: QEMU >= 10\.1.*qemu-system-x86.*InRelease"):
        ensure_qemu()
    with pytest.raises(OfflineError, match=r"missing: the guest kernel \(linux-image-amd64"):
        ensure_kernel()


def test_tests_skip_offline_but_fail_under_ci(offline, monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="missing: QEMU"):
        guest_kit()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(OfflineError):
        guest_kit()
