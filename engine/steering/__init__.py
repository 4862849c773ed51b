"""Steering: what to change (`spec`), the hook that changes it (`intervention`), running the
default and steered generation (`run`), caching results (`cache`) and finding an SAE of a
build to steer (`target`)."""
