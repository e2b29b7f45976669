"""Figure builders: store -> tidy xarray/pandas -> matplotlib figures (DESIGN §1)."""
