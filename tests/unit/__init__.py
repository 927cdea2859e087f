"""The broker-free layer: the pool's parts called directly, in this process, in seconds."""
