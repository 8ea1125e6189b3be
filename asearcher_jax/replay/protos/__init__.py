"""Generated gRPC/protobuf modules of the replay queue service (see generate.sh)."""
