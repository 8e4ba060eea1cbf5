"""Generated gRPC stubs for ``syncnorm.coordinator.v1`` (scripts/generate-protos.sh); do not edit."""
