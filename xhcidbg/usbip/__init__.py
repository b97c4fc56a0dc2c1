"""USB/IP: devices of other machines on the controller's root ports (the client side)."""
