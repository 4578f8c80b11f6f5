"""vmm-sandboxer: micro-VM pods (QEMU). Not implemented yet; see the README's status table."""
