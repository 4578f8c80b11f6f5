"""Settings for the whole test process, made before any test module imports grpc."""

import os

# The tests fork (the pod holder's fallback path, setns helpers) in a process whose grpc.aio channels
# have run. With grpcio's fork support on, its fork handlers abort a forked child that forks again
# (the holder's intermediate process, on its way to exit): a "Fatal Python error: Aborted" and a core
# in the test log. No daemon of ours forks with grpc loaded; only this test process does.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
