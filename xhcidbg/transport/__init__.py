"""Transports: how a guest reaches the controller (in-process bus here; vfio-user in
`xhcidbg.vfio_user`)."""
