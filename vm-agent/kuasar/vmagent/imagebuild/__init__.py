"""Host-side tools that build the guest image (kernel, initramfs with the agent). Never shipped into it."""
