"""Fakes that speak the real formats: a simulated machine root (mountinfo, sysfs, df)."""
