"""The serving benchmark's parts: workloads and arrival schedules, metrics, the load generator."""
