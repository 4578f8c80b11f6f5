"""vm-agent: the guest agent, PID 1 in a pod's micro-VM (Task, Streaming and Agent services over vsock)."""

__version__ = "0.1.0"
