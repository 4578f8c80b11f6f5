"""quark-sandboxer: application-kernel pods, with gVisor's runsc (real) or Quark (untested) behind one daemon."""
