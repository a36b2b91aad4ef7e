"""Runtime: the coordinator, sessions, the desktop peer, local and emulated peer launchers,
and calibration (which measures this runtime for the simulator)."""
