"""Text decoders in the formats Linux prints: xHCI tracepoints/debugfs (`xhci`) and usbmon
(`usbmon`).  The tracer's viewer and the console share them."""
