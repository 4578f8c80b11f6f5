"""quark-sandboxer: app-kernel pods (gVisor runsc, Quark). Not implemented yet; see the README's status table."""
