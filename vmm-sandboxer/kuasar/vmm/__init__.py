"""vmm-sandboxer: a micro-VM per pod (QEMU), whose guest agent serves the Task API (see sandboxer.py)."""
