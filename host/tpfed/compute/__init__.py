"""Compute: the CFFI build of the firmware's C library, kernel wrappers, the int8 forward and
the units a device owns (its layer shares)."""
