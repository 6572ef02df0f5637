"""Site gateways: one site's devices on a local broker bridged to the central one."""
