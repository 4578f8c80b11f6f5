"""Fakes of runtimes that cannot run on the test machines (a fake `quark`); never used outside tests."""
