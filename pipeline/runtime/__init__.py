"""The process around the training: its process group (rendezvous, all-reduce, shut-down), exit codes,
stop signals and the test-only fault hooks. Below every component that needs them."""
