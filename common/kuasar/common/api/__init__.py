"""Generated protobuf/gRPC stubs (built from common/protos by scripts/gen_protos.py; not in git)."""
