import os

# Several tests build device meshes; give the CPU backend 8 virtual devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
