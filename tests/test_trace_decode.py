"""The Linux-format text decoders, byte for byte against the kernel's own output."""
from xhcidbg.decode import usbmon as um
from xhcidbg.decode import xhci as lx
from xhcidbg.emu.trb import Trb
from xhcidbg.emu.trb import TrbType as T


def test_setup_trb_example_from_the_reference():
    # GET_DESCRIPTOR(Device, 18): IDT, TRT=IN, cycle
    dw = (0x01000680, 0x00120000, 0x00000008, 0x00030841)
    text = ("bRequestType 80 bRequest 06 wValue 0100 wIndex 0000 wLength 18 length 8 TD size 0 "
            "intr 0 type 'Setup Stage' flags I:i:C")
    assert lx.trb_line("CTRL", *dw) == "CTRL: " + text
    assert lx.trb_line("CTRL", *dw, dma=0x12345670) == "CTRL: @0x0000000012345670 " + text


def test_setup_trb_built_from_the_declared_layout_decodes_the_same():
    trb = Trb.build(T.SETUP_STAGE, bmRequestType=0x80, bRequest=6, wValue=0x0100, wLength=18,
                    length=8, idt=1, trt=3, cycle=1)
    assert trb.dwords == [0x01000680, 0x00120000, 0x00000008, 0x00030841]


def test_real_trace_lines_from_linux_usb():
    # xhci_handle_command / xhci_handle_cmd_set_deq / _set_deq_ep lines quoted in the reference
    set_deq = (0x16F65921, 0x00000001, 0, 4 << 24 | 1 << 16 | T.SET_TR_DEQUEUE << 10 | 1)
    assert lx.trb_line("CMD", *set_deq) == (
        "CMD: Set TR Dequeue Pointer Command: deq 0000000116f65921 stream 0 slot 4 ep 1 flags C")
    assert lx.decode_slot_context(9 << 27 | 1 << 20, 6 << 16, 0, 3 << 27 | 4) == (
        "RS 00000 full-speed Ctx Entries 9 MEL 0 us Port# 6/0 [TT Slot 0 Port# 0 TTT 0 Intr 0] "
        "Addr 4 State configured")
    assert lx.decode_ep_context(3, 3 << 1 | 4 << 3 | 64 << 16, 0x116F65921, 0) == (
        "State stopped mult 1 max P. Streams 0 interval 125 us max ESIT payload 0 CErr 3 "
        "Type Ctrl burst 0 maxp 64 deq 0000000116f65921 avg trb len 0")
    reset_ep = (0, 0, 0, 4 << 24 | 1 << 16 | T.RESET_ENDPOINT << 10 | 1)
    assert lx.trb_line("CMD", *reset_ep) == (
        "CMD: Reset Endpoint Command: ctx 0000000000000000 slot 4 ep 1 flags t:C")
    # xhci_ring_ep_doorbell: Ring doorbell for Slot 15 ep4in
    assert lx.decode_doorbell(15, 9) == "Slot 15 ep4in"


def test_every_trb_format():
    cases = {
        (0x1000, 0, 0, T.LINK << 10 | 1 << 1 | 1):
            "LINK 0000000000001000 intr 0 type 'Link' flags i:c:T:C",
        (0x2000, 0, 0x01000000, 1 << 24 | 3 << 16 | T.TRANSFER_EVENT << 10 | 1):
            "TRB 0000000000002000 status 'Success' len 0 slot 1 ep 3 type 'Transfer Event' flags "
            "e:C",
        (0x3000, 0, 0x0D000004, 2 << 24 | 1 << 16 | T.TRANSFER_EVENT << 10 | 1 << 2):
            "TRB 0000000000003000 status 'Short Packet' len 4 slot 2 ep 1 type 'Transfer Event' "
            "flags E:c",
        (0x4000, 0, 18, T.DATA_STAGE << 10 | 1 << 16 | 1 << 5 | 1):
            "Buffer 0000000000004000 length 18 TD size 0 intr 0 type 'Data Stage' flags "
            "i:I:c:s:i:e:C",
        (0, 0, 0, T.STATUS_STAGE << 10 | 1 << 5 | 1):
            "Buffer 0000000000000000 length 0 TD size 0 intr 0 type 'Status Stage' flags I:c:e:C",
        (0x5000, 0, 512 | 1 << 22, T.NORMAL << 10 | 1 << 9 | 1 << 2 | 1 << 4):
            "Buffer 0000000000005000 length 512 TD size 0 intr 1 type 'Normal' flags "
            "B:i:i:C:s:I:e:c",
        (0, 0, 0, T.ENABLE_SLOT << 10 | 1): "Enable Slot Command: flags C",
        (0, 0, 0, 3 << 24 | T.DISABLE_SLOT << 10): "Disable Slot Command: slot 3 flags c",
        (0x6000, 0, 0, 1 << 24 | T.ADDRESS_DEVICE << 10 | 1 << 9 | 1):
            "Address Device Command: ctx 0000000000006000 slot 1 flags B:C",
        (0x6000, 0, 0, 1 << 24 | T.CONFIGURE_ENDPOINT << 10 | 1):
            "Configure Endpoint Command: ctx 0000000000006000 slot 1 flags d:C",
        (0x6000, 0, 0, 1 << 24 | T.EVALUATE_CONTEXT << 10 | 1):
            "Evaluate Context Command: ctx 0000000000006000 slot 1 flags C",
        (0, 0, 0, 2 << 24 | 1 << 23 | 5 << 16 | T.STOP_ENDPOINT << 10 | 1):
            "Stop Ring Command: slot 2 sp 1 ep 5 flags C",
        (0, 0, 0, 2 << 24 | T.RESET_DEVICE << 10 | 1): "Reset Device Command: slot 2 flags C",
        (0, 0, 0, T.NOOP_COMMAND << 10 | 1): "No-Op Command: flags C",
        (0, 0, 0, 25 << 10 | 1): "type 'UNKNOWN' -> raw 00000000 00000000 00000000 00006401",
    }
    for dw, text in cases.items():
        assert lx.decode_trb(*dw) == text


def test_portsc_usbsts_and_input_control_context():
    portsc = 1 | 1 << 1 | 3 << 10 | 1 << 9 | 1 << 17 | 1 << 21 | 1 << 25
    assert lx.decode_portsc(portsc) == (
        "Powered Connected Enabled Link:U0 PortSpeed:3 Change: CSC PRC Wake: WCE ")
    assert lx.decode_portsc(5 << 5) == (
        "Powered-off Not-connected Disabled Link:RxDetect PortSpeed:0 Change: Wake: ")
    assert lx.decode_usbsts(0x19) == " 0x00000019 HCHalted EINT PCD"
    assert lx.decode_usbsts(0xFFFFFFFF) == " 0xffffffff"
    assert lx.decode_ctrl_ctx(0, 0b11) == "Add: slot ep0"
    assert lx.decode_ctrl_ctx(1 << 3, 1 | 1 << 3 | 1 << 4) == "Drop: 1in, Add: slot 1in 2out"
    assert lx.decode_doorbell(0, 0) == "Command Ring 0"
    assert lx.decode_doorbell(1, 1) == "Slot 1 ep0in"
    assert lx.decode_doorbell(2, 4 | 7 << 16) == "Slot 2 ep2out Stream 7"


def test_usbmon_text_examples_from_the_kernel_documentation():
    s = um.UsbmonRecord(0xD5EA89A0, "S", um.XFER_CONTROL, 0x80, 1, 1, 0, ord("<"), 3575,
                        914555, -115, 4, 0, bytes.fromhex("a300000003000400"))
    c = um.UsbmonRecord(0xD5EA89A0, "C", um.XFER_CONTROL, 0x80, 1, 1, ord("-"), 0, 3575,
                        914560, 0, 4, 4, bytes(8), data=bytes.fromhex("01050000"))
    assert um.text_line(s) == "d5ea89a0 3575914555 S Ci:1:001:0 s a3 00 0000 0003 0004 4 <"
    assert um.text_line(c) == "d5ea89a0 3575914560 C Ci:1:001:0 0 4 = 01050000"
    for rec in (s, c):
        assert um.UsbmonRecord.parse(um.pack_record(rec)) == rec
        assert um.UsbmonRecord.parse(um.pack_record(rec, ">"), ">") == rec
