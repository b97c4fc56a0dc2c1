"""Chapter 9 behaviour of StandardDevice, driven through submit() with real UsbTransfers."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xhcidbg.devices import (
    DirectHost,
    EpType,
    Keyboard,
    LoopbackDevice,
    Speed,
    Status,
    StorageDevice,
    Tablet,
    TransferError,
    UsbTransfer,
)
from xhcidbg.devices.declaration import (
    DEFER,
    Configuration,
    EndpointDecl,
    Interface,
    Stall,
    control_request,
    on_transfer,
)
from xhcidbg.devices.descriptor_set import endpoint_descriptors
from xhcidbg.devices.descriptors import (
    BinaryObjectStoreDescriptor,
    ConfigurationDescriptor,
    DescriptorType,
    DeviceDescriptor,
    DeviceQualifierDescriptor,
    Recipient,
    RequestType,
    StringDescriptor,
    StringLanguageDescriptor,
    SuperSpeedUSBDeviceCapabilityDescriptor,
    USB2ExtensionDescriptor,
    describe_setup,
    parse_descriptors,
    setup_packet,
)
from xhcidbg.devices.standard import DeviceState, StandardDevice

GET_STATUS, CLEAR_FEATURE, SET_FEATURE = 0, 1, 3
SET_ADDRESS, GET_DESCRIPTOR, GET_CONFIGURATION, SET_CONFIGURATION = 5, 6, 8, 9
GET_INTERFACE, SET_INTERFACE, SET_SEL, SET_ISOCH_DELAY = 10, 11, 48, 49


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def all_devices(image):
    return [Tablet(), Tablet(speed=Speed.HIGH), Keyboard(), Keyboard(speed=Speed.LOW),
            Keyboard(speed=Speed.HIGH), StorageDevice(image),
            StorageDevice(image, speed=Speed.HIGH), StorageDevice(image, speed=Speed.FULL),
            LoopbackDevice(),
            LoopbackDevice(speed=Speed.HIGH), LoopbackDevice(speed=Speed.FULL)]


def stalls(xfer: UsbTransfer) -> bool:
    return xfer.done and xfer.status == Status.STALL


def test_enumeration_sequence_every_device_and_speed(image):
    for dev in all_devices(image):
        host = DirectHost(dev)
        # The exact sequence a host runs, checking each answer.
        dev.bus_reset()
        assert dev.state == DeviceState.DEFAULT and dev.address == 0
        head = host.get_descriptor(DescriptorType.DEVICE, length=8)
        assert len(head) == 8
        mps0 = {Speed.SUPER: 9, Speed.LOW: 8}.get(dev.speed, 64)
        assert head[7] == mps0
        host.control_out(0x00, SET_ADDRESS, 7)
        assert dev.state == DeviceState.ADDRESS and dev.address == 7
        desc = DeviceDescriptor.parse(host.get_descriptor(DescriptorType.DEVICE, length=18))
        assert desc.bcdUSB == (3.2 if dev.speed == Speed.SUPER else 2.0)
        assert desc.bMaxPacketSize0 == mps0
        assert (desc.idVendor, desc.idProduct) == (dev.vendor_id, dev.product_id)
        assert desc.bNumConfigurations == len(dev.configurations)
        head9 = host.get_descriptor(DescriptorType.CONFIGURATION, 0, 9)
        assert len(head9) == 9
        total = ConfigurationDescriptor.parse(head9).wTotalLength
        full = host.get_descriptor(DescriptorType.CONFIGURATION, 0, total)
        assert len(full) == total and full[:9] == head9
        parsed = parse_descriptors(full)
        assert all(not isinstance(p, bytes) for _, p in parsed), parsed   # everything decodes
        langs = StringLanguageDescriptor.parse(host.get_descriptor(DescriptorType.STRING, 0))
        assert list(langs.wLANGID) == [0x0409]
        for index, text in ((desc.iManufacturer, dev.manufacturer), (desc.iProduct, dev.product),
                            (desc.iSerialNumber, dev.serial_number)):
            assert StringDescriptor.parse(host.get_descriptor(DescriptorType.STRING, index,
                                                              lang=0x0409)).bString == text
        host.set_configuration(1)
        assert dev.state == DeviceState.CONFIGURED
        assert host.control_in(0x80, GET_CONFIGURATION, length=1) == b"\x01"
        # SuperSpeed: endpoint companions after every endpoint; other speeds: none.
        names = [n for n, _ in parsed]
        companions = names.count("SUPERSPEED_ENDPOINT_COMPANION")
        assert companions == (names.count("ENDPOINT") if dev.speed == Speed.SUPER else 0)
        assert str(dev) and dev.describe().startswith(dev.product)


def test_packet_sizes_and_intervals_per_speed(image):
    sizes = {}
    for speed in (Speed.FULL, Speed.HIGH, Speed.SUPER):
        dev = LoopbackDevice(speed=speed)
        eps = {p.bEndpointAddress: p for n, p in parse_descriptors(dev.configuration_descriptor(0))
               if n == "ENDPOINT"}
        sizes[speed] = eps
    assert sizes[Speed.FULL][0x81].wMaxPacketSize == 64
    assert sizes[Speed.HIGH][0x81].wMaxPacketSize == 512
    assert sizes[Speed.SUPER][0x81].wMaxPacketSize == 1024
    # Interrupt every 1 ms: 1 frame at full speed, 2^(4-1) microframes at high/super speed.
    assert sizes[Speed.FULL][0x82].bInterval == 1
    assert sizes[Speed.HIGH][0x82].bInterval == 4
    assert sizes[Speed.SUPER][0x82].bInterval == 4
    assert sizes[Speed.FULL][0x82].wMaxPacketSize == 64
    assert sizes[Speed.FULL][0x83].wMaxPacketSize == 1023
    # The tablet's 8 ms polling: bInterval 8 at full speed, 2^(7-1) microframes at high speed.
    assert EndpointDecl(0x81, EpType.INTERRUPT, 8, interval_us=8000).interval_for(Speed.FULL) == 8
    assert EndpointDecl(0x81, EpType.INTERRUPT, 8, interval_us=8000).interval_for(Speed.HIGH) == 7
    assert EndpointDecl(0x81, EpType.INTERRUPT, 8, interval_us=10000).interval_for(Speed.HIGH) == 7


def test_a_high_bandwidth_endpoint_carries_its_extra_transactions_at_high_speed_only():
    ep = EndpointDecl(0x81, EpType.ISOCHRONOUS, 1024, interval_us=125, hs_mult=2)
    [(_, high)] = parse_descriptors(endpoint_descriptors(ep, Speed.HIGH))
    assert high.wMaxPacketSize == 1024 | 2 << 11 and ep.bytes_per_interval(Speed.HIGH) == 3072
    [(_, full)] = parse_descriptors(endpoint_descriptors(ep, Speed.FULL))
    assert full.wMaxPacketSize == 1023 and ep.bytes_per_interval(Speed.FULL) == 1023


def test_bos_only_for_superspeed():
    ss = DirectHost(LoopbackDevice(speed=Speed.SUPER))
    bos = ss.get_descriptor(DescriptorType.BOS, length=5)
    header = BinaryObjectStoreDescriptor.parse(bos)
    assert header.bNumDeviceCaps == 2
    full = ss.get_descriptor(DescriptorType.BOS, length=header.wTotalLength)
    parsed = parse_descriptors(full)
    caps = [p for n, p in parsed if n == "DEVICE_CAPABILITY"]
    assert caps[0].bDevCapabilityType == 2 and caps[0].bmAttributes == 2      # LPM
    assert USB2ExtensionDescriptor.parse(full[5:12]) == caps[0]
    ss_cap = caps[1]
    assert ss_cap.bDevCapabilityType == 3 and ss_cap.wSpeedsSupported == 0b1110
    assert ss_cap.bFunctionalitySupport == 1 and ss_cap.bU1DevExitLat <= 10
    assert SuperSpeedUSBDeviceCapabilityDescriptor.parse(full[12:22]).wU2DevExitLat <= 0x7FF
    hs = DirectHost(LoopbackDevice(speed=Speed.HIGH))
    assert stalls(hs.control(0x80, GET_DESCRIPTOR, DescriptorType.BOS << 8, 0, 5))


def test_device_qualifier_and_other_speed_rules():
    hs = DirectHost(Tablet(speed=Speed.HIGH))
    q = DeviceQualifierDescriptor.parse(hs.get_descriptor(DescriptorType.DEVICE_QUALIFIER,
                                                          length=10))
    assert q.bcdUSB == 2.0 and q.bNumConfigurations == 1 and q.bMaxPacketSize0 == 64
    other = hs.get_descriptor(DescriptorType.OTHER_SPEED_CONFIGURATION, 0, 255)
    assert other[1] == DescriptorType.OTHER_SPEED_CONFIGURATION
    eps = [p for n, p in parse_descriptors(other) if n == "ENDPOINT"]
    assert eps[0].bInterval == 8          # the full-speed encoding, seen from high speed
    # An HS-capable device at full speed describes its high-speed self.
    fs = DirectHost(Tablet(speed=Speed.FULL))
    assert len(fs.get_descriptor(DescriptorType.DEVICE_QUALIFIER, length=10)) == 10
    other = fs.get_descriptor(DescriptorType.OTHER_SPEED_CONFIGURATION, 0, 255)
    assert next(p for n, p in parse_descriptors(other) if n == "ENDPOINT").bInterval == 7
    # SuperSpeed devices, and devices that cannot run at high speed, have no qualifier.
    ss = DirectHost(LoopbackDevice(speed=Speed.SUPER))
    for kind in (DescriptorType.DEVICE_QUALIFIER, DescriptorType.OTHER_SPEED_CONFIGURATION):
        assert stalls(ss.control(0x80, GET_DESCRIPTOR, kind << 8, 0, 10))


def test_unsupported_requests_stall():
    dev = LoopbackDevice(speed=Speed.SUPER)
    host = DirectHost(dev)
    host.enumerate()
    cases = [
        (0x80, GET_DESCRIPTOR, DescriptorType.CONFIGURATION << 8 | 5, 0, 9),   # no config 5
        (0x80, GET_DESCRIPTOR, DescriptorType.STRING << 8 | 99, 0x409, 255),  # no string 99
        (0x80, GET_DESCRIPTOR, 0x42 << 8, 0, 9),                              # unknown type
        (0x80, 7, 0, 0, 0),                                                   # SET_DESCRIPTOR
        (0x00, SET_CONFIGURATION, 9, 0, 0),                                   # no config 9
        (0x01, SET_INTERFACE, 5, 0, 0),                                       # no alt 5
        (0x81, GET_INTERFACE, 0, 3, 1),                                       # no interface 3
        (0x82, GET_STATUS, 0, 0x85, 2),                                       # no endpoint 5
        (0x80, 0x77, 0, 0, 0),                                                # unknown request
        (0x00, GET_DESCRIPTOR, 0x100, 0, 0),                                  # wrong direction
        (0xC0, 0x33, 0, 0, 4),                                                # unknown vendor
        (0xA1, 0x01, 0, 0, 4),                                                # no class handler
        (0x00, SET_FEATURE, 2, 0, 0),                                         # TEST_MODE at SS
    ]
    for request_type, request, value, index, length in cases:
        xfer = host.control(request_type, request, value, index, length)
        assert stalls(xfer), (hex(request_type), request, describe_setup(xfer.setup))
    # Malformed SETUP packets stall too.
    for setup in (b"\x80\x06", bytes(9)):
        xfer = UsbTransfer(0, EpType.CONTROL, 0, setup=setup)
        dev.submit(xfer)
        assert stalls(xfer)
    # A control-stage STALL is a protocol stall: the next request works.
    assert host.control_in(0x80, GET_CONFIGURATION, length=1) == b"\x01"


def test_set_address_and_configuration_state_machine():
    dev = Keyboard()
    host = DirectHost(dev)
    dev.bus_reset()
    assert stalls(host.control(0x00, SET_CONFIGURATION, 1))          # not in Default state
    assert stalls(host.control(0x00, SET_ADDRESS, 200))              # out of range
    host.control_out(0x00, SET_ADDRESS, 5)
    assert host.control_in(0x80, GET_CONFIGURATION, length=1) == b"\x00"
    host.set_configuration(1)
    assert dev.state == DeviceState.CONFIGURED
    assert stalls(host.control(0x00, SET_ADDRESS, 6))                # not while configured
    host.set_configuration(0)                                         # deconfigure
    assert dev.state == DeviceState.ADDRESS and dev.configuration is None
    assert host.control_in(0x80, GET_CONFIGURATION, length=1) == b"\x00"
    x = host.submit_in(1, 8)
    assert x.done and x.status == Status.XACT_ERROR                   # no endpoints now
    host.control_out(0x00, SET_ADDRESS, 0)                            # back to Default
    assert dev.state == DeviceState.DEFAULT
    host.control_out(0x00, SET_ADDRESS, 9)
    host.set_configuration(1)
    dev.bus_reset()
    assert (dev.state, dev.address, dev.configuration) == (DeviceState.DEFAULT, 0, None)


def test_alternate_settings_and_configurations():
    dev = LoopbackDevice()
    host = DirectHost(dev)
    host.enumerate()
    assert dev.endpoint(0x83) is None                                 # iso only in alt 1
    assert host.control_in(0x81, GET_INTERFACE, 0, 0, 1) == b"\x00"
    host.set_interface(0, 1)
    assert host.control_in(0x81, GET_INTERFACE, 0, 0, 1) == b"\x01"
    assert dev.endpoint(0x83).type == EpType.ISOCHRONOUS
    assert host.control_in(0x82, 12, 0, 0x83, 2) == b"\0\0"           # SYNCH_FRAME on iso
    host.set_interface(0, 0)
    assert dev.endpoint(0x83) is None
    x = host.submit_in(3, 1024)
    assert x.status == Status.XACT_ERROR
    host.set_configuration(2)
    assert dev.mode == "loopback" and dev.configuration_value == 2
    assert host.control_in(0x80, GET_CONFIGURATION, length=1) == b"\x02"


def test_get_status_and_features_hs():
    dev = Tablet(speed=Speed.HIGH)
    host = DirectHost(dev)
    host.enumerate()
    assert host.control_in(0x80, GET_STATUS, 0, 0, 2) == b"\0\0"
    host.control_out(0x00, SET_FEATURE, 1)                           # DEVICE_REMOTE_WAKEUP
    assert host.control_in(0x80, GET_STATUS, 0, 0, 2) == b"\x02\x00"
    host.control_out(0x00, CLEAR_FEATURE, 1)
    assert host.control_in(0x80, GET_STATUS, 0, 0, 2) == b"\0\0"
    assert host.control_in(0x81, GET_STATUS, 0, 0, 2) == b"\0\0"      # interface 0
    assert host.control_in(0x82, GET_STATUS, 0, 0x80, 2) == b"\0\0"   # ep0
    assert host.control_in(0x82, GET_STATUS, 0, 0x81, 2) == b"\0\0"
    # SuperSpeed link power features do not exist at high speed.
    assert stalls(host.control(0x00, SET_FEATURE, 48))
    assert stalls(host.control(0x00, SET_SEL, 0, 0, data=bytes(6)))
    assert stalls(host.control(0x00, SET_ISOCH_DELAY, 40))


def test_superspeed_features_sel_isoch_delay():
    dev = LoopbackDevice(speed=Speed.SUPER)
    host = DirectHost(dev)
    host.enumerate(configuration=None)
    host.control_out(0x00, SET_ISOCH_DELAY, 40)
    assert dev.isoch_delay_ns == 40
    host.control_out(0x00, SET_SEL, 0, 0, bytes([1, 2, 3, 0, 4, 0]))
    assert dev.sel == bytes([1, 2, 3, 0, 4, 0])
    assert stalls(host.control(0x00, SET_SEL, 0, 0, data=bytes(5)))   # wLength must be 6
    assert stalls(host.control(0x00, SET_FEATURE, 48))                # U1 needs configured
    host.set_configuration(1)
    host.control_out(0x00, SET_FEATURE, 48)
    host.control_out(0x00, SET_FEATURE, 49)
    assert host.control_in(0x80, GET_STATUS, 0, 0, 2)[0] & 0b1100 == 0b1100
    host.control_out(0x00, CLEAR_FEATURE, 48)
    assert host.control_in(0x80, GET_STATUS, 0, 0, 2)[0] & 0b1100 == 0b1000
    assert stalls(host.control(0x00, SET_FEATURE, 50, 0, data=b"x"))  # wLength must be 0
    host.control_out(0x01, SET_FEATURE, 0, 0x0200)                    # FUNCTION_SUSPEND, RW
    assert dev.function_suspend[0] == 2


def test_endpoint_halt_stalls_until_cleared():
    dev = LoopbackDevice(speed=Speed.HIGH)
    host = DirectHost(dev)
    host.enumerate()
    assert len(host.read(1, 512)) == 512
    host.control_out(0x02, SET_FEATURE, 0, 0x81)                      # ENDPOINT_HALT
    assert host.control_in(0x82, GET_STATUS, 0, 0x81, 2) == b"\x01\x00"
    assert stalls(host.submit_in(1, 512))
    assert stalls(host.submit_in(1, 512))                             # stays halted
    assert host.write(1, bytes(512)) == 512                           # other endpoint unaffected
    host.clear_halt(0x81)
    assert host.control_in(0x82, GET_STATUS, 0, 0x81, 2) == b"\x00\x00"
    assert len(host.read(1, 512)) == 512
    # Halt on ep0 is accepted and means nothing; halts vanish with a bus reset.
    host.control_out(0x02, SET_FEATURE, 0, 0x00)
    host.control_out(0x02, SET_FEATURE, 0, 0x01)
    host.enumerate()
    assert not dev.is_halted(0x01)


def test_cancel_and_bus_reset_drop_pending_transfers():
    dev = LoopbackDevice()
    host = DirectHost(dev)
    host.enumerate()
    host.set_configuration(2)                    # loopback: IN waits for looped data
    a = host.submit_in(1, 64)
    b = host.submit_in(1, 64)
    assert not a.done and not b.done
    assert dev.cancel(a) is True
    assert dev.cancel(a) is False
    host.write(1, b"x" * 10)
    assert b.done and b.result == b"x" * 10 and not a.done
    c = host.submit_in(1, 64)
    dev.bus_reset()
    host.enumerate()
    host.set_configuration(2)
    host.write(1, b"y")
    assert not c.done                            # dropped by the reset, never completed
    assert dev.cancel(c) is False


def test_describe_setup_texts():
    assert describe_setup(setup_packet(0x80, 6, 0x0100, 0, 18)) == \
        "GET_DESCRIPTOR DEVICE index 0 len 18"
    assert describe_setup(setup_packet(0x00, 5, 3)) == "SET_ADDRESS 3"
    assert describe_setup(setup_packet(0x02, 1, 0, 0x81)) == \
        "CLEAR_FEATURE ENDPOINT_HALT endpoint 0x81"
    assert describe_setup(setup_packet(0x80, 0, 0, 0, 2)) == "GET_STATUS device"
    assert "class request 0xfe" in describe_setup(setup_packet(0xA1, 0xFE, 0, 0, 1))
    assert describe_setup(b"\x01").startswith("malformed")


@settings(max_examples=300, deadline=None)
@given(setup=st.binary(min_size=8, max_size=8))
def test_describe_setup_never_raises(setup):
    assert describe_setup(setup)


@settings(max_examples=150, deadline=None)
@given(setup=st.binary(min_size=8, max_size=8), data=st.binary(max_size=64),
       length=st.integers(0, 4096))
def test_hostile_control_requests_never_raise(setup, data, length):
    for dev in (Tablet(), Keyboard(), LoopbackDevice()):
        host = DirectHost(dev)
        host.enumerate()
        xfer = UsbTransfer(0, EpType.CONTROL, length, setup=setup,
                           data=None if setup[0] & 0x80 else data)
        dev.submit(xfer)
        assert xfer.done and xfer.status in (Status.OK, Status.STALL, Status.BABBLE)
        # The device still enumerates afterwards.
        host.enumerate()


def test_transfer_error_reports_status():
    host = DirectHost(Tablet())
    with pytest.raises(TransferError) as e:
        host.control_in(0x80, GET_DESCRIPTOR, 0x4200, 0, 8)
    assert e.value.status == Status.STALL


class Gadget(StandardDevice):
    """A device declared the way every virtual device is: two interfaces, handlers by
    decorator, one request answered later."""

    name = "gadget"
    product = "Test Gadget"
    speeds = (Speed.FULL, Speed.HIGH, Speed.SUPER)
    configurations = (
        Configuration(1, name="only", remote_wakeup=True, interfaces=(
            Interface(0, (EndpointDecl(0x81, EpType.BULK), EndpointDecl(0x01, EpType.BULK)),
                      name="data"),
            Interface(1, (EndpointDecl(0x82, EpType.INTERRUPT, max_packet=16, interval_us=2000),),
                      cls=0x0A, name="events"),
        )),
    )

    def __init__(self, speed=None):
        super().__init__(speed)
        self.later = []
        self.endpoint_resets = []

    @on_transfer(0x81)
    def _echo_length(self, xfer):
        xfer.complete(Status.OK, xfer.length.to_bytes(4, "little"))

    @control_request(0x01, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
    def _hello(self, request):
        return b"hello" + bytes([request.value])

    @control_request(0x02, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
    def _slow(self, request):
        self.later.append(request.xfer)
        return DEFER

    @control_request(0x03, type=RequestType.CLASS, recipient=Recipient.INTERFACE)
    def _interface_request(self, request):
        if request.interface != 1:
            raise Stall
        return None

    def on_endpoint_reset(self, address):
        self.endpoint_resets.append(address)


def test_declared_gadget():
    dev = Gadget(speed=Speed.HIGH)
    host = DirectHost(dev)
    enum = host.enumerate()
    parsed = parse_descriptors(enum.configuration)
    assert [p.bInterfaceNumber for n, p in parsed if n == "INTERFACE"] == [0, 1]
    config = parsed[0][1]
    assert config.bNumInterfaces == 2 and config.bmAttributes == 0xA0
    assert StringDescriptor.parse(host.get_descriptor(
        DescriptorType.STRING, config.iConfiguration)).bString == "only"
    ep = next(p for n, p in parsed if n == "ENDPOINT" and p.bEndpointAddress == 0x82)
    assert ep.wMaxPacketSize == 16 and ep.bInterval == 5               # 2 ms = 2^4 microframes
    assert host.read(1, 777) == (777).to_bytes(4, "little")
    assert host.submit_out(1, b"x").status == Status.STALL             # no handler: STALL
    assert host.control_in(0xC0, 0x01, 7, 0, 64) == b"hello\x07"
    assert host.control_in(0xC0, 0x01, 7, 0, 3) == b"hel"              # wLength truncates
    pending = host.control(0xC0, 0x02, 0, 0, 4)
    assert not pending.done
    dev.later.pop().complete(Status.OK, b"done")
    assert pending.done and pending.result == b"done"
    host.control_out(0x21, 0x03, 0, 1)
    assert stalls(host.control(0x21, 0x03, 0, 0))
    assert stalls(host.control(0x21, 0x03, 0, 7))                      # no interface 7
    host.clear_halt(0x82)
    assert dev.endpoint_resets == [0x82]
    dev.set_speed(Speed.SUPER)
    host.enumerate()
    assert dev.device_descriptor()[2:4] == b"\x20\x03"
    with pytest.raises(ValueError):
        dev.set_speed(Speed.LOW)
    with pytest.raises(ValueError, match="does not run at low-speed"):
        Gadget(speed=Speed.LOW)
