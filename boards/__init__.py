"""Board and device profiles (data). Read them through :mod:`tpfed.planning.profiles`."""
