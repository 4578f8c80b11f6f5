"""vm-agent: the guest agent (PID 1 in the VM). Not implemented yet; see the README's status table."""
